"""A diffusers Stable Diffusion 3 script. Only the import line differs from diffusers' own.

    python examples/diffusers_style.py                      # the small model shipped in the package
    python examples/diffusers_style.py stabilityai/stable-diffusion-3.5-medium --steps 28 --size 1024

Images go to ./diffusers_style_out/ (or --out).
"""

import argparse
import os

import numpy as np
import torch
from PIL import Image

from sd35fp8 import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline
# was: from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline

parser = argparse.ArgumentParser()
parser.add_argument("model", nargs="?", default=None, help="model id, folder or file (default: the shipped model)")
parser.add_argument("--steps", type=int, default=28)
parser.add_argument("--size", type=int, default=128)
parser.add_argument("--out", default="diffusers_style_out")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
if args.model is None:  # the shipped file: any SD3.5 single file or diffusers folder loads the same way
    from sd35fp8.tiny import SHIPPED_CHECKPOINT

    args.model = str(SHIPPED_CHECKPOINT)
pipe = StableDiffusion3Pipeline.from_pretrained(args.model, torch_dtype=dtype)
pipe = pipe.to(device)
pipe.set_progress_bar_config(disable=True)
print("components:", type(pipe.transformer).__name__, type(pipe.vae).__name__, type(pipe.text_encoder).__name__,
      type(pipe.text_encoder_2).__name__, type(pipe.text_encoder_3).__name__, type(pipe.tokenizer).__name__,
      type(pipe.tokenizer_2).__name__, type(pipe.tokenizer_3).__name__, pipe.scheduler.config)

prompt = "a red circle above a blue square"
seen = []


def on_step_end(pipeline, step, timestep, callback_kwargs):
    seen.append((step, float(timestep), tuple(callback_kwargs["latents"].shape)))
    return callback_kwargs


image = pipe(
    prompt,
    negative_prompt=None,
    num_inference_steps=args.steps,
    guidance_scale=4.0,
    height=args.size,
    width=args.size,
    generator=torch.Generator("cpu").manual_seed(13),
    callback_on_step_end=on_step_end,
    callback_on_step_end_tensor_inputs=["latents"],
).images[0]
image.save(os.path.join(args.out, "txt2img.png"))
print("steps seen by the callback:", len(seen), "first timestep:", seen[0][1])

# per-encoder prompts and T5 length
image = pipe(prompt=prompt, prompt_2=prompt, prompt_3="a red circle above a blue square, flat colours",
             negative_prompt="blurry", negative_prompt_3="", max_sequence_length=128,
             num_inference_steps=args.steps, guidance_scale=4.0, height=args.size, width=args.size,
             generator=torch.Generator("cpu").manual_seed(13)).images[0]
image.save(os.path.join(args.out, "prompt_3.png"))

# other output types
arr = pipe(prompt, num_inference_steps=args.steps, height=args.size, width=args.size, output_type="np",
           generator=torch.Generator().manual_seed(13)).images
np.save(os.path.join(args.out, "txt2img.npy"), arr)
(pt,) = pipe(prompt, num_inference_steps=args.steps, height=args.size, width=args.size, output_type="pt",
             return_dict=False, generator=torch.Generator().manual_seed(13))
latents = pipe(prompt, num_inference_steps=args.steps, height=args.size, width=args.size, output_type="latent",
               generator=torch.Generator().manual_seed(13)).images
print("np", arr.shape, arr.dtype, "pt", tuple(pt.shape), pt.dtype, "latent", tuple(latents.shape))

# img2img and inpainting
init = Image.open(os.path.join(args.out, "txt2img.png")).convert("RGB")
img2img = StableDiffusion3Img2ImgPipeline.from_pipe(pipe)
image = img2img(prompt="a red circle above a green square", image=init, strength=0.6,
                num_inference_steps=args.steps, guidance_scale=4.0,
                generator=torch.Generator("cpu").manual_seed(1)).images[0]
image.save(os.path.join(args.out, "img2img.png"))

mask = Image.new("L", init.size, 0)
mask.paste(255, (0, init.height // 2, init.width, init.height))  # repaint the lower half
if args.model.endswith(".safetensors"):  # diffusers' single-file loader (a file, not a repo id)
    inpaint = StableDiffusion3InpaintPipeline.from_single_file(args.model, torch_dtype=dtype).to(device)
    inpaint.set_progress_bar_config(disable=True)
else:
    inpaint = StableDiffusion3InpaintPipeline.from_pipe(pipe)
image = inpaint(prompt="a red circle above a green square", image=init, mask_image=mask, strength=1.0,
                num_inference_steps=args.steps, guidance_scale=4.0,
                generator=torch.Generator("cpu").manual_seed(1)).images[0]
image.save(os.path.join(args.out, "inpaint.png"))

# memory savers (on a CPU-only machine the offload calls say there is nothing to offload to)
pipe.enable_vae_tiling()
pipe.enable_model_cpu_offload()
pipe.enable_sequential_cpu_offload()
image = pipe(prompt, num_inference_steps=args.steps, height=args.size, width=args.size,
             generator=torch.Generator("cpu").manual_seed(13)).images[0]
image.save(os.path.join(args.out, "low_memory.png"))
pipe = pipe.to(torch.float16)
image = pipe(prompt, num_inference_steps=args.steps, height=args.size, width=args.size,
             generator=torch.Generator("cpu").manual_seed(13)).images[0]
image.save(os.path.join(args.out, "float16.png"))
print("done:", sorted(os.listdir(args.out)))
