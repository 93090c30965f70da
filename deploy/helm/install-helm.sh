#!/usr/bin/env bash
# Builds the pinned helm from its Go module into .tools/helm/<version>/ (git-ignored) and prints
# the binary's path. A second run finds the binary and builds nothing. Needs Go and the Go
# module proxy; the tests that run helm call this script.
set -euo pipefail
cd "$(dirname "$0")/../.."

HELM_VERSION=v3.22.1
dest="$PWD/.tools/helm/$HELM_VERSION"
bin="$dest/helm"
if [ ! -x "$bin" ]; then
    command -v go >/dev/null 2>&1 || { echo "install-helm.sh: go not found" >&2; exit 1; }
    mkdir -p "$dest"
    echo "install-helm.sh: building helm $HELM_VERSION (once; cached in $dest)" >&2
    GOBIN="$dest" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi
echo "$bin"
