#!/usr/bin/env bash
# Regenerate the tiny diffusers models and reference outputs under tests/fixtures/
# (tiny-sd/, tiny-controlnet/, reference/), then the LoRA fixtures (lora/, reference/lora/)
# the LCM fixtures (reference/lcm/), the TAESD fixtures (tiny-taesd/, reference/taesd/), the
# tokenizer.json-only tokenizer (tokenizer-json/) and the single-file layouts (single-file/).
# See the scripts' headers for the files.
#
# Usage: tests/reference/run.sh
#   REF_VENV=DIR      venv to use/create (default: .venv-ref in the repository root)
#   REF_NO_INSTALL=1  use REF_VENV as it is, install nothing
# pip honours PIP_INDEX_URL / PIP_EXTRA_INDEX_URL, e.g. for CPU-only torch wheels.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${REF_VENV:-$root/.venv-ref}
open_clip_pin="open-clip-torch==3.3.0"

if [ "${REF_NO_INSTALL:-0}" != 1 ]; then
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    stamp="$venv/.sdcrossframe-fixtures-requirements"
    want=$( (cat "$here/requirements.txt"; echo "$open_clip_pin") | sha256sum | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        "$venv/bin/python" -m pip install --upgrade pip
        "$venv/bin/python" -m pip install -r "$here/requirements.txt"
        "$venv/bin/python" -m pip install --no-deps "$open_clip_pin"
        echo "$want" > "$stamp"
    fi
fi

if "$venv/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("ftfy") is None)'; then
    echo "warning: ftfy is installed in $venv; the tokenizer references assume it is not" >&2
fi

cd "$root"
"$venv/bin/python" "$here/make_fixtures.py" "$@"
"$venv/bin/python" "$here/make_lora_fixtures.py"
"$venv/bin/python" "$here/make_lcm_fixtures.py"
"$venv/bin/python" "$here/make_taesd_fixtures.py"
"$venv/bin/python" "$here/make_tokenizer_json_fixture.py"
"$venv/bin/python" "$here/make_singlefile_fixtures.py"
