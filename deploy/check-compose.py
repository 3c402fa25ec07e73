#!/usr/bin/env python3
"""Validates compose.yaml without a Docker engine (none runs on the build machine): the YAML
parses, and the facts the deployment relies on hold. Exit 1 with a reason otherwise."""
import sys
import yaml

path = sys.argv[1] if len(sys.argv) > 1 else "compose.yaml"
with open(path) as f:
    doc = yaml.safe_load(f)

def fail(msg):
    print(f"{path}: {msg}", file=sys.stderr)
    sys.exit(1)

services = doc.get("services") or fail("no services")
for name in ("qdrant", "redis", "tandem"):
    if name not in services:
        fail(f"service {name!r} missing")
    if name != "catalog" and "healthcheck" not in services[name]:
        fail(f"service {name!r} has no healthcheck")
q = services["qdrant"]["image"]
if not q.startswith("qdrant/qdrant:v") or q.endswith(":latest"):
    fail(f"qdrant image {q!r} is not pinned to a version")
if not services["redis"]["image"].startswith("redis:7"):
    fail("redis must be redis:7")
redis_cmd = " ".join(map(str, services["redis"]["command"]))
if "--appendonly yes" not in redis_cmd:
    fail("redis runs without AOF")
env = services["tandem"]["environment"]
if env.get("TANDEM_INDEX__BACKEND") != "qdrant":
    fail("tandem must run with index.backend=qdrant")
if env.get("TANDEM_SESSION__BACKEND") != "redis":
    fail("tandem must run with session.backend=redis")
if services["tandem"].get("build") != ".":
    fail("tandem must build from the Dockerfile")
declared = set(doc.get("volumes") or {})
for name, svc in services.items():
    for v in svc.get("volumes", []):
        vol = v.split(":")[0]
        if not vol.startswith(("/", ".")) and vol not in declared:
            fail(f"service {name!r} uses undeclared volume {vol!r}")
    for dep in (svc.get("depends_on") or {}):
        if dep not in services:
            fail(f"service {name!r} depends on unknown {dep!r}")
# Replicas: every tandem service reads the same model store from a shared named volume, and
# keeps its data dir off shared volumes (two replicas must never write one data dir).
replicas = {n: s for n, s in services.items() if n == "tandem" or n.startswith("tandem-")}
stores = set()
for name, svc in replicas.items():
    renv = svc.get("environment") or {}
    store = renv.get("TANDEM_REGISTRY__MODEL_STORE")
    if not store:
        fail(f"replica {name!r} has no TANDEM_REGISTRY__MODEL_STORE")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", []) if ":" in v}
    if mounts.get(store) not in declared:
        fail(f"replica {name!r}: the model store {store!r} is not on a named volume")
    stores.add((store, mounts[store]))
    data_dir = renv.get("TANDEM_DATA_DIR", "")
    if len(replicas) > 1 and any(data_dir == m or data_dir.startswith(m + "/") for m in mounts):
        fail(f"replica {name!r}: TANDEM_DATA_DIR {data_dir!r} is on a volume the replicas share")
if len(stores) > 1:
    fail(f"the replicas read different model stores: {sorted(stores)}")
print(f"{path}: ok ({', '.join(services)})")
