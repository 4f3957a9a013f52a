#!/usr/bin/env bash
# Builds kube-apiserver v1.20.2 from Debian's source package and caches the
# binary outside the repository. Prints the binary's path on its last line.
# Needs root for apt-get. Debian ships no kube-apiserver binary; this is the
# real API server the operator tests run against, with etcd from etcd-server.
set -euo pipefail
cache="${SESSIONMESH_CACHE:-$HOME/.cache/sessionmesh}"
bin="$cache/kube-apiserver-1.20.2"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
mkdir -p "$cache/src"
export DEBIAN_FRONTEND=noninteractive
# deb-src entries mirroring the configured Debian sources.
if ! grep -rqs "deb-src" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > /etc/apt/sources.list.d/sessionmesh-src.sources
  else
    grep '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' > /etc/apt/sources.list.d/sessionmesh-src.list
  fi
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends golang-go rsync etcd-server golang-github-modern-go-reflect2-dev dpkg-dev make >/dev/null
cd "$cache/src"
if [ ! -d kubernetes-1.20.2 ]; then
  apt-get source -qq --download-only kubernetes >/dev/null 2>&1 || apt-get source --download-only kubernetes
  dpkg-source -x --no-check kubernetes_*.dsc kubernetes-1.20.2 >/dev/null
fi
cd kubernetes-1.20.2
# The vendored reflect2 1.0.1 crashes under Go >= 1.18 on the first custom resource.
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
make WHAT=cmd/kube-apiserver >/dev/null
cp _output/bin/kube-apiserver "$bin.tmp"
mv "$bin.tmp" "$bin"
echo "$bin"
