// Command etcd is etcd's server, built from go.etcd.io/etcd/server/v3 because
// the root go.etcd.io/etcd/v3 module (which holds upstream's main.go) replaces
// its siblings with relative paths and so cannot be required from outside.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
