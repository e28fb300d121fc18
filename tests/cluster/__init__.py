"""A cluster of 2-3 nodes on one machine for multi-node tests (needs root and iproute2).

    with VirtualCluster(n=2, local_dir=tmp / "local") as c:
        c.start_sshd()                       # optional: sshd per node, keys per cluster
        c.run(0, ["hostname"]).stdout        # "vnode1\n"; c.nodes[1].ip == "10.213.X.2"

Tests get one from the ``virtual_cluster`` fixture (``tests.cluster.fixtures``), which skips with
the reason when namespaces cannot be made here.
"""
from tests.cluster.cluster import ClusterUnavailable, Node, VirtualCluster, unavailable_reason

__all__ = ["ClusterUnavailable", "Node", "VirtualCluster", "unavailable_reason"]
