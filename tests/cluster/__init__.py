"""A real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager)
plus a process-running node agent, for the cluster tests and ``make cluster``."""
