package dataplane

import (
	"context"

	"github.com/cairn-csi/cairn/tests/nbdclient"
)

// The NBD client lives in tests/nbdclient (tests/torture uses it too); these
// names keep the tests here short.

type (
	nbdConn = nbdclient.Conn
	nbdCall = nbdclient.Call
)

const nbdEIO = nbdclient.EIO

var errNBDClosed = nbdclient.ErrClosed

func dialNBD(ctx context.Context, path string) (*nbdConn, error) { return nbdclient.Dial(ctx, path) }

func isNBDErrno(err error, errno uint32) bool { return nbdclient.IsErrno(err, errno) }
