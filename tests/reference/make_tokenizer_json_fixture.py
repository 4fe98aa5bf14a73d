"""The tiny model's tokenizer as transformers 5 saves it: tokenizer.json (no vocab.json /
merges.txt) and tokenizer_config.json, written to tests/fixtures/tokenizer-json/.

CLIPTokenizer.from_pretrained("tests/fixtures/tiny-sd/tokenizer").save_pretrained(tmp), with
tokenizer.json rewritten as compact JSON (same content, 1.7 MB instead of 3.6 MB indented).
tests/tokenizer_json.rs loads it in place of tiny-sd's tokenizer/.
Run from the repository root (tests/reference/run.sh does).
"""

import json
import shutil
import tempfile
from pathlib import Path

import transformers
from transformers import CLIPTokenizer

SOURCE = Path("tests/fixtures/tiny-sd/tokenizer")
OUT = Path("tests/fixtures/tokenizer-json")


def main():
    assert transformers.__version__.startswith("5."), transformers.__version__
    tokenizer = CLIPTokenizer.from_pretrained(str(SOURCE))
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        written = {Path(p).name for p in tokenizer.save_pretrained(tmp)}
        assert "tokenizer.json" in written and "vocab.json" not in written, written
        data = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        (OUT / "tokenizer.json").write_text(
            json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
        )
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if name in written:
                shutil.copy(Path(tmp) / name, OUT / name)
    # The fixture must reproduce the source tokenizer (and so tokens.json).
    reloaded = CLIPTokenizer.from_pretrained(str(OUT))
    for prompt in ["a beautiful woman with red hair", "ΟΔΥΣΣΕΥΣ", "a <|ENDOFTEXT|> b"]:
        assert reloaded(prompt).input_ids == tokenizer(prompt).input_ids, prompt
    for f in sorted(OUT.iterdir()):
        print(f"{f}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
