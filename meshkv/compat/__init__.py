"""LMCache compatibility: the ``lmcache_controller`` shim.

The shim keeps LMCache's controller command line and HTTP API so existing setups keep working,
but it is never on a data path: it is a gossip member with no store that seeds the mesh on the
pull/reply ports and answers the HTTP API from the member table and the members' data planes.
"""
