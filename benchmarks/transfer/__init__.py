"""`dvd bench transfer`: feature transfer between two processes, beside its ceilings.

Modules: `shapes` (what is moved), `ceilings` (memcpy and raw-socket baselines),
`feature_server` (a VisionService that streams prepared features through the real
senders, no ViT), `measure` (the real receivers on the other end), `report`, `cli`.
"""
