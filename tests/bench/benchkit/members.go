package benchkit

import (
	"fmt"
	"os"
	"path/filepath"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/internal/loopback"
	"github.com/cairn-csi/cairn/replication/meta"
)

// Members are store members running in this process (metabench,
// scalebench).
type Members struct {
	Root     string // their data dirs' parent, a new temporary directory
	Agents   []*meta.Agent
	APIAddrs []string
}

// StartMembers starts n store members named prefix1 … prefixN, with their
// data dirs in a new temporary directory named after prog, each on a
// loopback address of its own (package loopback) with BootstrapExpect n;
// the addresses are picked up front, since Peers must name them before any
// member starts. tune may change each member's configuration. On error the
// members started so far are in the result, for the caller to stop.
func StartMembers(log *zap.Logger, prog string, n int, prefix string, tune func(*meta.AgentConfig)) (*Members, error) {
	m := &Members{}
	root, err := os.MkdirTemp("", prog+"-")
	if err != nil {
		return m, err
	}
	m.Root = root
	addrs, err := loopback.Addrs(n, 2)
	if err != nil {
		return m, err
	}
	for _, a := range addrs {
		m.APIAddrs = append(m.APIAddrs, a[1])
	}
	for i := range n {
		id := fmt.Sprintf("%s%d", prefix, i+1)
		cfg := meta.AgentConfig{
			Store: meta.StoreConfig{
				NodeID: id, DataDir: filepath.Join(root, id), RaftBind: addrs[i][0], TimeoutMultiplier: 1,
				Logger: log.With(zap.String("member", id)),
			},
			APIBind: m.APIAddrs[i], BootstrapExpect: n, Peers: m.APIAddrs,
		}
		if tune != nil {
			tune(&cfg)
		}
		a, err := meta.StartAgent(cfg)
		if err != nil {
			return m, fmt.Errorf("%s: %w", id, err)
		}
		m.Agents = append(m.Agents, a)
	}
	return m, nil
}
