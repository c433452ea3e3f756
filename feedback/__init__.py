"""Users' feedback events: their types, and the durable stores the server and training share.

`open_store(url)` picks the store by URL: `sqlite://PATH` (embedded, the default) or
`redis://host:port/db` (shared by several replicas or worker processes). Nothing here imports
grpc, onnxruntime or torch: the server, `bertrec train --feedback` and the tests use it alike.
"""
