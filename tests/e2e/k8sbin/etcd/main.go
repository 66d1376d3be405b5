// Command etcd is etcd 3.6 at the version Kubernetes v1.34.3 requires, built
// in this module because Debian's etcd (3.4) is older than the API server
// accepts.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
