"""Does qwix's LoRA (0.1.8, the library Tunix uses) fit this model? Prints the evidence of README.md.

  pip install --no-deps qwix==0.1.8   # its requirements (jax, flax >= 0.12, opt_einsum, absl) are met
  PYTHONPATH=. python experiments/2026-12-04_lora/qwix_fit.py

Three checks on the tiny model, in the project's functional style (split once, plain jax.jit over
the flat {hf_key: array} params, nnx.merge inside):
  1. apply_lora_to_model through `__call__` (which splits the module and merges it inside its jitted
     forward): how many adapters exist afterwards;
  2. through `forward_embeds` (the trainer's text forward): adapter names, shapes, logical axes, and
     whether the same layers see the adapters when reached through another method (the sampler calls
     `decode_step`, i.e. the text model directly);
  3. a second method: qwix keeps one intercepted method per NNX model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from spacer_jax import tree_utils
from spacer_jax.models import qwen2_5_vl


def main():
  cfg = qwen2_5_vl.tiny()
  model = qwen2_5_vl.init_model(cfg)
  ids = jnp.array([[1, 2, 3, 4, 5]], jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(5)[None, None], (3, 1, 5))
  mask = jnp.ones((1, 5), bool)
  provider = qwix.LoraProvider(module_path=r".*(q_proj|v_proj)", rank=4, alpha=8.0)

  # 1. Through __call__.
  via_call = qwix.apply_lora_to_model(model, provider, np.asarray(ids), rngs=nnx.Rngs(0))
  n = sum("lora" in k for k in tree_utils.split_model(via_call)[1])
  print(f"1. via __call__: {n} LoRA params created")

  # 2. Through forward_embeds.
  lm = qwix.apply_lora_to_model(model, provider, model.embed(ids), pos, mask,
                                methods=("forward_embeds",), rngs=nnx.Rngs(0))
  graphdef, flat, paths = tree_utils.split_model(lm)
  keys = [k for k in flat if "lora" in k]
  _, state = nnx.split(lm)
  print(f"2. via forward_embeds: {len(keys)} LoRA params, e.g.")
  for p, v in state.flat_state():
    k = tree_utils.key_of(p)
    if k in keys[:2]:
      print(f"   {k} {type(v).__name__} {v.get_value().shape} {v.get_metadata().get('out_sharding')}")
  moved = {k: (jnp.ones_like(v) if k.endswith("_lora_b") else v) for k, v in flat.items()}

  def trainer_forward(params):
    m = tree_utils.merge_model(graphdef, params, paths)
    return m.forward_embeds(m.embed(ids), pos, mask)[0]

  def text_model_directly(params):
    m = tree_utils.merge_model(graphdef, params, paths)
    return m.model(m.model.embed_tokens(ids), pos, mask)[0]

  for name, fn in (("forward_embeds", trainer_forward), ("the text model directly", text_model_directly)):
    f = jax.jit(fn)
    print(f"   {name} sees the adapters (B = 1 changes the output): "
          f"{bool(jnp.abs(f(flat) - f(moved)).max() > 0)}")

  # 3. A second method replaces the first.
  lm2 = qwix.apply_lora_to_model(lm, qwix.LoraProvider(module_path=r".*attn\.qkv", rank=4, alpha=8.0),
                                 ids, methods=("embed",), rngs=nnx.Rngs(0))
  print("3. methods intercepted after a second apply_lora_to_model:",
        [m for m in ("forward_embeds", "embed") if m in type(lm2).__dict__])


if __name__ == "__main__":
  main()
