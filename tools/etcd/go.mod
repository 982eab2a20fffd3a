// Builds the etcd server from the published go.etcd.io/etcd/server/v3 module;
// main.go is the two-line entry point etcd's own root module has.
// Bump together with tools/versions.env.
module edgeslim/tools/etcd

go 1.26.0

require go.etcd.io/etcd/server/v3 v3.7.3
