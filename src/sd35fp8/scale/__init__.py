"""Serving at scale: engine replicas on Ray Serve (ray_serve.py, replica.py) and one image on several
processes / GPUs with torch.distributed (parallel.py). Ray is optional (`pip install sd35fp8[scale]`)
and imported only by the functions that need it."""
