"""The model repository: the on-disk contract every other part of bertrec reads or writes.

`<repo>/<model>/<version>/` holds the files named in `artifacts`, described by the manifest in
`manifest`; `versions` lists, resolves and atomically publishes versions, and `opened` returns
one verified, memory-mapped version. Train, export, server and bench all import this package
and it imports none of them (numpy and the standard library only), so the contract has one
home and no import cycle.
"""
