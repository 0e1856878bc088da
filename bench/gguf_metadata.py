"""Write the embedded SmolLM2 GGUF's metadata (tokenizer and general fields, no tensors) to a small GGUF, so the
GPU machine, which cannot carry the 94 MB model, can build the tests' tiny GGUFs (bench/fetch_gpu_wheels.sh).

    python bench/gguf_metadata.py .smol/metadata.gguf
"""

from __future__ import annotations

import sys

from gguf import GGUFReader, GGUFValueType, GGUFWriter

from overspill.runtime.sources import default_gguf_path


def main(out: str) -> None:
    source = GGUFReader(default_gguf_path())
    writer = GGUFWriter(out, source.fields["general.architecture"].contents())
    for field in source.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main(sys.argv[1])
