"""Kubernetes: the objects that deploy an instance to a fleet (a KMM ``Module``, or kvc's own
DaemonSets and removal Jobs), and the node side those DaemonSets run (``kvc k8s agent``)."""
