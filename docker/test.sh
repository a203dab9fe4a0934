#!/usr/bin/env bash
# `make docker-test`: build the images, start the compose stack (Prefect server on PostgreSQL, a
# stock Prefect worker, a Dask scheduler and 2 Dask workers), run a tiny replication in one
# container with its shards on local threads (the reference), then through the `replicate`
# deployment with its shards on the Dask worker containers, `docker kill` one of them mid-shard,
# and check that the run completes, that the lost worker was logged with its shard, that the
# shards were written by the Dask workers and that every PGD set is byte-identical to the
# reference. A rerun then computes nothing.
#
# Environment: BASE_IMAGE (default: a local debootstrap image, built if missing by
# docker/build-base.sh), POSTGRES_IMAGE (default: docker/postgres built on BASE_IMAGE),
# WORKERS (2 Dask worker containers), KEEP=1 to leave the stack and store up for inspection.
# Exit status 3: no Docker engine or compose could be found or started (nothing was tested).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORKERS=${WORKERS:-2}
PROJECT=advfeatures-test
t0=$(date +%s)
say() { echo "[docker-test $(( $(date +%s) - t0 ))s] $*"; }

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
else echo "docker-test: neither 'docker compose' nor docker-compose is installed (apt-get install docker-compose)" >&2; exit 3; fi

if ! docker info >/dev/null 2>&1; then
    if command -v dockerd >/dev/null && [ "$(id -u)" = 0 ]; then
        say "starting dockerd"
        (dockerd >/tmp/advfeatures-dockerd.log 2>&1 &)
        for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    fi
    docker info >/dev/null 2>&1 || { echo "docker-test: no Docker engine: apt-get install docker.io, then start dockerd" >&2; exit 3; }
fi

if [ -z "${BASE_IMAGE:-}" ]; then
    BASE_IMAGE=advfeatures-base:bookworm
    docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || { say "building $BASE_IMAGE"; docker/build-base.sh "$BASE_IMAGE"; }
fi
say "building advfeatures:latest on $BASE_IMAGE"
build() { docker build -q "$@" >/tmp/advfeatures-docker-build.log 2>&1 || { tail -40 /tmp/advfeatures-docker-build.log >&2; exit 1; }; }
build -f docker/Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" -t advfeatures:latest .
if [ -z "${POSTGRES_IMAGE:-}" ]; then
    POSTGRES_IMAGE=advfeatures-postgres:15
    say "building $POSTGRES_IMAGE"
    build --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$POSTGRES_IMAGE" docker/postgres
fi

STORE_DIR=$(mktemp -d /tmp/advfeatures-docker-store.XXXXXX)
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export ADVFEATURES_IMAGE=advfeatures:latest POSTGRES_IMAGE STORE_DIR PORT
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f docker/compose.yaml "$@"; }
cleanup() {
    rc=$?
    if [ "$rc" != 0 ]; then compose logs --tail 60 2>/dev/null | tail -200 || true; fi
    if [ "${KEEP:-0}" = 1 ]; then say "KEEP=1: stack left up (project $PROJECT), store in $STORE_DIR"; return; fi
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    rm -rf "$STORE_DIR"
}
trap cleanup EXIT

say "compose up: postgres, server, deploy, a Prefect worker, a Dask scheduler and $WORKERS Dask workers (UI on port $PORT)"
compose down -v --remove-orphans >/dev/null 2>&1 || true
compose up -d --scale dask-worker="$WORKERS" >/dev/null 2>&1 || { compose up -d --scale dask-worker="$WORKERS"; exit 1; }
deploy_id=$(compose ps -q deploy)
[ "$(docker wait "$deploy_id")" = 0 ] || { echo "docker-test: the deploy step failed:" >&2; docker logs "$deploy_id" >&2; exit 1; }
for _ in $(seq 60); do
    [ "$(compose ps -q dask-worker | wc -l)" -ge "$WORKERS" ] && [ -n "$(compose ps -q worker)" ] && break; sleep 1
done

compose exec -T worker advfeatures synth /store/data/tiny.zip --train 400 --test 200 >/dev/null
over=(runtime.threads=1 data.source=/store/data/tiny.zip construct.n_images=400 construct.shard_size=25 attack.steps=200)
sets=(); for o in "${over[@]}"; do sets+=(--set "$o"); done
json=$(printf '"%s", ' "${over[@]}")
say "reference: the tiny replication in the worker container, shards on its threads (store /store/local)"
compose exec -T -e ADVFEATURES_SET=fanout.executor=local worker advfeatures run --profile tiny --store /store/local \
    "${sets[@]}" >/tmp/advfeatures-docker-local.log 2>&1 || { tail -40 /tmp/advfeatures-docker-local.log >&2; exit 1; }

say "the replicate deployment, its shards on the Dask workers (store /store/dask); one Dask worker killed mid-shard"
params="{\"profile\": \"tiny\", \"store\": \"/store/dask\", \"overrides\": [${json%, }]}"
compose exec -T worker prefect deployment run replicate/replicate --params "$params" \
    --watch --watch-interval 3 --watch-timeout 1200 >/tmp/advfeatures-docker-run.log 2>&1 &
watch_pid=$!
victim=$(compose ps -q dask-worker | head -1)
for _ in $(seq 600); do
    ls "$STORE_DIR"/dask/constructed/*/_shards/*.json >/dev/null 2>&1 && break; sleep 0.5
done
ls "$STORE_DIR"/dask/constructed/*/_shards/*.json >/dev/null 2>&1 || { echo "docker-test: no shard was written" >&2; exit 1; }
docker kill "$victim" >/dev/null
say "killed Dask worker $(docker inspect -f '{{.Config.Hostname}}' "$victim") after the first shard marker"
wait "$watch_pid" || { tail -20 /tmp/advfeatures-docker-run.log >&2; echo "docker-test: the run did not complete" >&2; exit 1; }
tail -3 /tmp/advfeatures-docker-run.log
compose logs worker 2>/dev/null | grep -m3 "lost while holding" \
    || { echo "docker-test: no lost Dask worker was logged with its shard (killed between shards?)" >&2; exit 1; }

say "checking the table, who wrote the shards, and the sets against the reference"
dworkers=$(for c in $(compose ps -aq dask-worker); do docker inspect -f '{{.Config.Hostname}}' "$c"; done | paste -sd, -)
"$PY" docker/check_run.py "$STORE_DIR/dask" --min-hosts 2 --workers "$dworkers" --same-as "$STORE_DIR/local"

say "rerun: everything cached, no manifest rewritten"
touch "$STORE_DIR/.before-rerun"
compose exec -T worker prefect deployment run replicate/replicate --params "$params" \
    --watch --watch-interval 3 --watch-timeout 600 | tail -1
rewritten=$(find "$STORE_DIR/dask" -name manifest.json -newer "$STORE_DIR/.before-rerun" | wc -l)
[ "$rewritten" = 0 ] || { echo "docker-test: the rerun rewrote $rewritten manifests" >&2; exit 1; }
say "passed"
