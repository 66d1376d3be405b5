package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// `cairn dev csi` calls the dev cluster's CSI services the way the
// Kubernetes sidecars and kubelet would, so a volume can be created,
// staged and published on a node without a Kubernetes cluster.

func newDevCSICommand() *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "csi",
		Short: "Drive the dev cluster's CSI services as Kubernetes would (create, publish, expand, unpublish, delete)",
		Example: `  id=$(cairn dev csi --dir .demo create data --size 256Mi --param replicas=3)
  cairn dev csi --dir .demo publish $id --node node-1     # prints the mounted path
  cairn dev csi --dir .demo expand $id --size 1Gi --node node-1
  cairn dev csi --dir .demo unpublish $id --node node-1
  cairn dev csi --dir .demo delete $id`,
	}
	cmd.PersistentFlags().StringVar(&dir, "dir", "", "the dev cluster's directory (required)")
	cmd.AddCommand(newDevCSICreate(&dir), newDevCSIPublish(&dir), newDevCSIUnpublish(&dir), newDevCSIExpand(&dir), newDevCSIDelete(&dir))
	return cmd
}

// csiConns dials the controller and, if node is set, that node's endpoint.
func csiConns(dir, node string) (csipb.ControllerClient, csipb.NodeClient, func(), error) {
	if dir == "" {
		return nil, nil, nil, errors.New("--dir is required")
	}
	c, err := loadDevCluster(dir)
	if err != nil {
		return nil, nil, nil, err
	}
	if c.Controller == nil || c.Controller.CSI == "" {
		return nil, nil, nil, fmt.Errorf("the dev cluster in %s has no CSI controller", dir)
	}
	dial := func(ep string) (*grpc.ClientConn, error) {
		return grpc.NewClient("unix://"+strings.TrimPrefix(ep, "unix://"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	cc, err := dial(c.Controller.CSI)
	if err != nil {
		return nil, nil, nil, err
	}
	closers := []func(){func() { cc.Close() }}
	done := func() {
		for _, f := range closers {
			f()
		}
	}
	var nc csipb.NodeClient
	if node != "" {
		n, err := c.node(node)
		if err != nil {
			done()
			return nil, nil, nil, err
		}
		conn, err := dial(n.CSI)
		if err != nil {
			done()
			return nil, nil, nil, err
		}
		closers = append(closers, func() { conn.Close() })
		nc = csipb.NewNodeClient(conn)
	}
	return csipb.NewControllerClient(cc), nc, done, nil
}

func devCapability(fsType string, block bool) *csipb.VolumeCapability {
	vc := &csipb.VolumeCapability{AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	if block {
		vc.AccessType = &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}}
	} else {
		vc.AccessType = &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: fsType}}
	}
	return vc
}

func newDevCSICreate(dir *string) *cobra.Command {
	var size string
	var params, secrets []string
	cmd := &cobra.Command{
		Use:   "create NAME",
		Short: "CreateVolume; prints the volume id",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			bytes, err := parseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			p, err := parseParamFlags(params)
			if err != nil {
				return err
			}
			ctrl, _, done, err := csiConns(*dir, "")
			if err != nil {
				return err
			}
			defer done()
			ctx, cancel := context.WithTimeout(cmd.Context(), time.Minute)
			defer cancel()
			sec, err := parseSecretFlags(secrets)
			if err != nil {
				return err
			}
			resp, err := ctrl.CreateVolume(ctx, &csipb.CreateVolumeRequest{Name: args[0], Parameters: p, Secrets: sec,
				CapacityRange:      &csipb.CapacityRange{RequiredBytes: int64(bytes)},
				VolumeCapabilities: []*csipb.VolumeCapability{devCapability("", false)}})
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), resp.GetVolume().GetVolumeId())
			return nil
		},
	}
	cmd.Flags().StringVar(&size, "size", "1Gi", "volume size")
	cmd.Flags().StringArrayVar(&params, "param", nil, "StorageClass parameter key=value (repeatable)")
	cmd.Flags().StringArrayVar(&secrets, "secret", nil, "CSI secret KEY=VALUE of CreateVolume, as the provisioner passes its Secret's keys (repeatable; encryptionPassphrase=… for encryption)")
	return cmd
}

// parseSecretFlags reads --secret KEY=VALUE flags into the map of secrets
// a CSI request carries. The values never appear in errors.
func parseSecretFlags(flags []string) (map[string]string, error) {
	out := map[string]string{}
	for _, f := range flags {
		k, v, ok := strings.Cut(f, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--secret %s=…: want KEY=VALUE", k)
		}
		if _, dup := out[k]; dup {
			return nil, fmt.Errorf("--secret %s given twice", k)
		}
		out[k] = v
	}
	return out, nil
}

// devPaths are the staging and target paths kubelet would use.
func devPaths(dir, node, id string) (string, string) {
	base := filepath.Join(abs(dir), "kubelet", node)
	return filepath.Join(base, "staging", id), filepath.Join(base, "pods", id, "mount")
}

func newDevCSIPublish(dir *string) *cobra.Command {
	var node, fsType string
	var secrets []string
	cmd := &cobra.Command{
		Use:   "publish ID --node NODE_ID",
		Short: "ControllerPublish + NodeStage + NodePublish; prints the mounted path",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if node == "" {
				return errors.New("--node is required")
			}
			ctrl, nc, done, err := csiConns(*dir, node)
			if err != nil {
				return err
			}
			defer done()
			ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Minute)
			defer cancel()
			id, vc := args[0], devCapability(fsType, false)
			staging, target := devPaths(*dir, node, id)
			if _, err := ctrl.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: id, NodeId: node, VolumeCapability: vc}); err != nil {
				return fmt.Errorf("ControllerPublishVolume: %w", err)
			}
			sec, err := parseSecretFlags(secrets)
			if err != nil {
				return err
			}
			if _, err := nc.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: vc, Secrets: sec}); err != nil {
				return fmt.Errorf("NodeStageVolume: %w", err)
			}
			if _, err := nc.NodePublishVolume(ctx, &csipb.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: vc}); err != nil {
				return fmt.Errorf("NodePublishVolume: %w", err)
			}
			fmt.Fprintln(cmd.OutOrStdout(), target)
			return nil
		},
	}
	cmd.Flags().StringVar(&node, "node", "", "node to publish on (required)")
	cmd.Flags().StringVar(&fsType, "fs-type", "ext4", "file system: ext4 or xfs")
	cmd.Flags().StringArrayVar(&secrets, "secret", nil, "CSI secret KEY=VALUE of NodeStageVolume, as kubelet passes the node-stage Secret's keys (repeatable)")
	return cmd
}

func newDevCSIUnpublish(dir *string) *cobra.Command {
	var node string
	cmd := &cobra.Command{
		Use:   "unpublish ID --node NODE_ID",
		Short: "NodeUnpublish + NodeUnstage + ControllerUnpublish",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if node == "" {
				return errors.New("--node is required")
			}
			ctrl, nc, done, err := csiConns(*dir, node)
			if err != nil {
				return err
			}
			defer done()
			ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Minute)
			defer cancel()
			id := args[0]
			staging, target := devPaths(*dir, node, id)
			if _, err := nc.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
				return fmt.Errorf("NodeUnpublishVolume: %w", err)
			}
			if _, err := nc.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
				return fmt.Errorf("NodeUnstageVolume: %w", err)
			}
			if _, err := ctrl.ControllerUnpublishVolume(ctx, &csipb.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: node}); err != nil {
				return fmt.Errorf("ControllerUnpublishVolume: %w", err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&node, "node", "", "node the volume is published on (required)")
	return cmd
}

func newDevCSIExpand(dir *string) *cobra.Command {
	var node, size string
	cmd := &cobra.Command{
		Use:   "expand ID --size SIZE [--node NODE_ID]",
		Short: "ControllerExpandVolume, then NodeExpandVolume on the node it is published on; prints the new size",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			bytes, err := parseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			ctrl, nc, done, err := csiConns(*dir, node)
			if err != nil {
				return err
			}
			defer done()
			ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Minute)
			defer cancel()
			id, r := args[0], &csipb.CapacityRange{RequiredBytes: int64(bytes)}
			resp, err := ctrl.ControllerExpandVolume(ctx, &csipb.ControllerExpandVolumeRequest{VolumeId: id, CapacityRange: r})
			if err != nil {
				return fmt.Errorf("ControllerExpandVolume: %w", err)
			}
			capacity := resp.GetCapacityBytes()
			if node != "" && resp.GetNodeExpansionRequired() {
				// As kubelet: the path the volume is published at.
				_, target := devPaths(*dir, node, id)
				nr, err := nc.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: id, VolumePath: target, CapacityRange: r})
				if err != nil {
					return fmt.Errorf("NodeExpandVolume: %w", err)
				}
				capacity = nr.GetCapacityBytes()
			}
			fmt.Fprintln(cmd.OutOrStdout(), capacity)
			return nil
		},
	}
	cmd.Flags().StringVar(&size, "size", "", "the new size (required)")
	cmd.Flags().StringVar(&node, "node", "", "node the volume is published on: grow its device and file system there too")
	_ = cmd.MarkFlagRequired("size")
	return cmd
}

func newDevCSIDelete(dir *string) *cobra.Command {
	return &cobra.Command{
		Use:   "delete ID",
		Short: "DeleteVolume",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctrl, _, done, err := csiConns(*dir, "")
			if err != nil {
				return err
			}
			defer done()
			ctx, cancel := context.WithTimeout(cmd.Context(), time.Minute)
			defer cancel()
			_, err = ctrl.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: args[0]})
			return err
		},
	}
}
