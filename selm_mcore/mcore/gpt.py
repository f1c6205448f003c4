"""``SelmGPTModel``: Megatron's GPTModel with the packed forward our trainer needs.

    logits = model(tokens, position_ids)                           # [B, T, V/tp], as GPTModel
    logits = model(tokens, position_ids, attention_plan=plan,      # [M, V/tp]: head rows only
                   head_index=head_index)

The packed forward (``attention_plan`` given: ``PackedBatch.attention_plan`` of
``selm_mcore.data.packing``) differs from GPTModel.forward in three places, all inside this
subclass (Megatron is not patched):

* RoPE follows ``position_ids`` token by token (GPTModel always uses 0..T-1): positions restart
  at every packed sequence and continue after a shared prompt;
* the plan goes to every layer's core attention in Megatron's ``packed_seq_params`` slot (the
  layer spec holds ``selm_mcore.mcore.attention.PackedAttention`` when packing), built once per
  micro-batch at collation: no layer computes indices or copies anything to the device;
* the output layer (LM head) runs only on the ``head_index`` positions, the ones whose next
  token is a response label. Under sequence parallelism the hidden states are gathered first
  and the head runs without its sequence-parallel gather (as GPTModel does for inference), so
  the gradient of every position is exact.

Without ``attention_plan`` the forward is GPTModel's own, unchanged. The parameters and the
sharded state dict are GPTModel's, so checkpoints do not depend on the packing.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from selm_mcore.data.attention_plan import AttentionPlan
from selm_mcore.mcore.attention import packed_layout


def rope_from_positions(inv_freq: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """RoPE angles [T, B, 1, head_dim] for positions [B, T] (non-interleaved, as Megatron's
    RotaryEmbedding: the same angle for dimension i and i + head_dim/2)."""
    freqs = position_ids.transpose(0, 1).to(inv_freq.dtype)[..., None] * inv_freq
    return torch.cat((freqs, freqs), dim=-1)[:, :, None, :]


class SelmGPTModel(GPTModel):
    """GPTModel plus the packed forward (module docstring)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        attention_plan: AttentionPlan | None = None,
        head_index: torch.Tensor | None = None,
        **kwargs,
    ):
        if attention_plan is None:
            return super().forward(input_ids, position_ids, attention_mask, **kwargs)
        if attention_mask is not None or kwargs:
            raise ValueError(
                "the packed forward takes no attention_mask or GPTModel options: "
                "the layout is attention_plan"
            )
        if head_index is None:
            raise ValueError("the packed forward needs head_index: the positions to score")
        decoder_input = self._preprocess(input_ids=input_ids, position_ids=position_ids)[0]
        rotary_pos_emb = rope_from_positions(self.rotary_pos_emb.inv_freq, position_ids)
        hidden_states = self.decoder(
            hidden_states=decoder_input,
            attention_mask=None,
            rotary_pos_emb=rotary_pos_emb,
            packed_seq_params=packed_layout(attention_plan),
        )
        if not self.post_process:
            return hidden_states
        return self.head_logits(hidden_states, head_index)

    def head_logits(self, hidden_states: torch.Tensor, head_index: torch.Tensor) -> torch.Tensor:
        """Logits [M, V/tp] of the positions ``head_index`` (flat over [B, T]) of the final
        hidden states [T, B, H] (T/tp rows per rank under sequence parallelism)."""
        sequence_parallel = self.output_layer.sequence_parallel
        if sequence_parallel:
            # The backward of this gather only splits: the head's own copy-to-TP region
            # (below, with sequence parallelism off) already all-reduces the input gradient.
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=self.output_layer.tp_group
            )
        seq_len, batch, hidden = hidden_states.shape
        selected = hidden_states.transpose(0, 1).reshape(batch * seq_len, hidden)
        selected = selected.index_select(0, head_index).unsqueeze(1)  # [M, 1, H]
        weight = (
            self.shared_embedding_or_output_weight()
            if self.share_embeddings_and_output_weights
            else None
        )
        self.output_layer.sequence_parallel = False
        try:
            logits, _ = self.output_layer(selected, weight=weight)
        finally:
            self.output_layer.sequence_parallel = sequence_parallel
        return logits.squeeze(1)
