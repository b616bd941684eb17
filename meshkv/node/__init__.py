"""A mesh member: membership, fetching, pushing, and the `MeshNode` facade."""

from meshkv.node.build import build_member
from meshkv.node.chains import ChainSlice
from meshkv.node.get_pipeline import ChunkLease
from meshkv.node.mesh_node import MeshNode

__all__ = ["ChainSlice", "ChunkLease", "MeshNode", "build_member"]
