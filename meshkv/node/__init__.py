"""A mesh member: membership, fetching, pushing, and the `MeshNode` facade."""

from meshkv.node.mesh_node import ChunkLease, MeshNode

__all__ = ["ChunkLease", "MeshNode"]
