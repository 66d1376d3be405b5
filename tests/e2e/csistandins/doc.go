// Package csistandins documents the module that holds the e2e harness's
// stand-ins for two CSI sidecars, csi-node-driver-registrar
// (./registrar) and livenessprobe (./livenessprobe).
//
// They are stand-ins because the Go module proxy does not serve the
// upstream modules here (it answers 403), so tests/e2e cannot build them
// from source as it builds the other sidecars. Each implements only what
// Cairn's manifests (deploy/kubernetes, from the Helm chart) and the e2e
// harness use: the flags they pass, kubelet's plugin registration API and
// a /healthz endpoint. They are test tools, not replacements for the
// upstream sidecars in a real cluster.
//
// The module is separate from Cairn's so that its dependencies (gRPC,
// the CSI spec, k8s.io/kubelet's registration API) stay pinned here and
// the commands build without a workspace, with CGO_ENABLED=0, into
// binaries that run in an image with nothing else in it.
package csistandins
