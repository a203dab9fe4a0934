#!/usr/bin/env bash
# A local Debian bookworm base image with python3, for machines that reach Debian's and PyPI's
# package mirrors but no container registry: debootstrap into a temporary folder, then
# `docker import`. Pass the result as BASE_IMAGE to docker/Dockerfile and docker/postgres/Dockerfile.
#
#   docker/build-base.sh [TAG]        (default advfeatures-base:bookworm; needs root and debootstrap)
#
# CA certificates this host trusts beyond Debian's (an egress proxy's, under
# /usr/local/share/ca-certificates) are copied in, so pip and apt inside the image trust what the
# host trusts; PIP_CERT points pip at the system bundle.
set -euo pipefail
TAG=${1:-advfeatures-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

command -v debootstrap >/dev/null || { echo "build-base: debootstrap is missing: apt-get install debootstrap" >&2; exit 2; }
docker info >/dev/null 2>&1 || { echo "build-base: no Docker engine answers: start dockerd (see docker/README.md)" >&2; exit 2; }

root=$(mktemp -d /tmp/advfeatures-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
fi
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
echo "built $TAG"
