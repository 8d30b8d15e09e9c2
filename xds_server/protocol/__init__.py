"""Sans-I/O xDS stream state machines (SotW and Delta) and their wire encoding.

Nothing here does I/O: xds_server.server feeds requests in and sends what
comes out. Tests drive these objects directly with fake streams.
"""
