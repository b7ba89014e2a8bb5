"""Fixed U-Net inputs for comparing two U-Nets' outputs (shared by the model and chain tests)."""

from lorachain.torch_env import torch


def unet_inputs(unet, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    kwargs = {
        "sample": torch.randn(batch, unet.config.in_channels, size, size, generator=generator),
        "timestep": torch.tensor([25, 700][:batch]),
        "encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator),
    }
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return kwargs
