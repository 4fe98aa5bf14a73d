#!/usr/bin/env bash
# Sets up a Debian 12 machine (scripts/setup-debian.sh) and runs every test on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-debian.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
export G_DEBUG=fatal_warnings
# A one-shot build gains nothing from incremental caches (hundreds of MB).
export CARGO_INCREMENTAL=0
# `cargo test` does not produce the plugin's cdylib; the end-to-end tests load it.
cargo build --workspace --locked
cargo test --workspace --locked --no-fail-fast
