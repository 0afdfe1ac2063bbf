"""Converting, quantizing and making FLUX.1-mini GGUF files.

* ``convert``: original weights (BFL / diffusers / Hugging Face names, safetensors or GGUF, one
  file per component or an all-in-one file) to one GGUF holding all four components, in
  gpustack's or upstream stable-diffusion.cpp's name layout, with gpustack's per-tensor type rules.
* ``quantize``: re-encode an existing all-in-one GGUF with other types.
* ``predict_file_size``: the exact size of a file before writing it (docs/MODEL.md §1.1).
* ``make_random``: a random-weight model of full size in any of gpustack's six variants, fast.

Everything streams: a tensor is read, converted and written in row chunks, so memory stays at a
few tens of MB whatever the model size. Types follow docs/MODEL.md §1.4 (``gpustack_type``).

Modules: ``type_rules`` (types, gpustack's type rules and variants, encoding), ``gguf_writer``
(streamed GGUF v3 writer), ``plan`` (output tensor plans, size prediction), ``random_model``
(random weights), ``readers`` (safetensors / GGUF / diffusers inputs), ``names`` (input names to
the inventory's bare names), ``build`` (convert and quantize). Dimension inference is
:func:`fluxmini.inventory.infer_dims`; the name prefixes are :mod:`fluxmini.names`.
"""

from ..inventory import infer_dims
from .build import ConvertResult, convert, detect_layout, quantize
from .gguf_writer import StreamingWriter, gguf_header
from .plan import plan_tensors, predict_file_size
from .random_model import SPLIT_FILES, iter_plan, make_random, random_tensor, write_random_model
from .readers import SrcTensor, close_inputs, read_input
from .type_rules import (ALIGNMENT, CHUNK_ELEMENTS, COMPONENT_TITLES, GPUSTACK_SIZES, SOURCE_TYPES, TYPE_NAMES,
                         VARIANTS, encode_tensor, ggml_type, gpustack_type, is_block_type, resolve_types,
                         tensor_nbytes, variant_name)

__all__ = [
    "ALIGNMENT", "CHUNK_ELEMENTS", "COMPONENT_TITLES", "ConvertResult", "GPUSTACK_SIZES", "SOURCE_TYPES",
    "SPLIT_FILES", "SrcTensor", "StreamingWriter", "TYPE_NAMES", "VARIANTS", "close_inputs", "convert",
    "detect_layout", "encode_tensor", "ggml_type", "gguf_header", "gpustack_type", "infer_dims",
    "is_block_type", "iter_plan", "make_random", "plan_tensors", "predict_file_size", "quantize",
    "random_tensor", "read_input", "resolve_types", "tensor_nbytes", "variant_name", "write_random_model",
]
