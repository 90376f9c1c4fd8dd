//! Module names of the three LoRA layouts, mapped to the diffusers module paths of
//! `HunyuanVideoTransformer3DModel` (what [`skyreels_models::HunyuanVideoTransformer3DModel::linears_mut`]
//! names).
//!
//! The original HunyuanVideo layout is renamed as diffusers 0.42.1's
//! `loaders/lora_conversion_utils.py::_convert_hunyuan_video_lora_to_diffusers` does: the same
//! replacement table in the same order, then its special cases (fused q/k/v and `linear1` split,
//! the final layer's shift/scale swap). Kohya names are recovered as musubi-tuner's
//! `convert_lora.py::convert_to_diffusers` does
//! (<https://github.com/kohya-ss/musubi-tuner/blob/30c658c4f4b0bf05038b3346eff9670259b10fc7/src/musubi_tuner/convert_lora.py#L120-L141>).
//! The replacement tables are the single-file loader's (the same dictionaries in diffusers).

use crate::single_file::{replace_all, RENAMES, TXT_IN_RENAMES};

/// How a file's `lora_B` (and its bias) spreads over the layers it targets; `lora_A` is the same
/// for every target but the final layer's (see `SwapHalves`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Split {
    /// One target, `lora_B` as it is.
    Whole,
    /// Several targets (fused q/k/v, a single block's `linear1`): `lora_B`'s rows cut in the
    /// order of the targets, each as many rows as its layer has outputs.
    Rows,
    /// One target whose output halves are swapped: the final layer's `[shift; scale]` becomes
    /// diffusers' `norm_out.linear` `[scale; shift]` (and, as diffusers does, `lora_A`'s rank
    /// rows too).
    SwapHalves,
}

/// `fused` (a module path ending in `from`) as one target per name in `parts`.
fn split_targets(module: &str, from: &str, parts: &[&str]) -> Vec<String> {
    parts
        .iter()
        .map(|p| module.replace(from, p))
        .collect::<Vec<_>>()
}

/// The diffusers targets of an original-layout module (no `diffusion_model.` / `transformer.`
/// prefix, no `.lora_A.weight` suffix), and how its `lora_B` spreads over them.
///
/// The final layer's swap is diffusers' exactly: the halves of `lora_B`'s rows and of `lora_A`'s
/// rank rows (the latter permutes the rank components against `lora_B`'s columns, so such a LoRA
/// computes another `B·A` than its trainer did; we follow the reference, see docs/loras.md).
/// Where diffusers cannot load a file, this goes on: a single block's `linear1` is cut by the
/// layers' widths (diffusers hard-codes 3072, HunyuanVideo's), and the token refiner's fused
/// `self_attn_qkv` shares its `lora_A` like the blocks' (diffusers chunks `lora_A` too, which
/// leaves the ranks mismatched).
pub(super) fn original_to_diffusers(module: &str) -> (Vec<String>, Split) {
    let key = replace_all(module, &RENAMES);
    if key.contains("txt_in") {
        return if key.contains("self_attn_qkv") {
            let qkv = split_targets(
                &key,
                "self_attn_qkv",
                &["attn.to_q", "attn.to_k", "attn.to_v"],
            );
            (
                qkv.iter()
                    .map(|k| replace_all(k, &TXT_IN_RENAMES))
                    .collect(),
                Split::Rows,
            )
        } else {
            (vec![replace_all(&key, &TXT_IN_RENAMES)], Split::Whole)
        };
    }
    if key.contains("img_attn_qkv") {
        let parts = ["attn.to_q", "attn.to_k", "attn.to_v"];
        return (split_targets(&key, "img_attn_qkv", &parts), Split::Rows);
    }
    if key.contains("txt_attn_qkv") {
        let parts = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"];
        return (split_targets(&key, "txt_attn_qkv", &parts), Split::Rows);
    }
    if key.contains("single_blocks") {
        let key = key.replace("single_blocks", "single_transformer_blocks");
        if let Some(block) = key.strip_suffix(".linear1") {
            let parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"];
            return (
                parts.iter().map(|p| format!("{block}.{p}")).collect(),
                Split::Rows,
            );
        }
        let key = key
            .replace("linear2", "proj_out")
            .replace("q_norm", "attn.norm_q")
            .replace("k_norm", "attn.norm_k");
        return (vec![key], Split::Whole);
    }
    if key.contains("final_layer.adaLN_modulation.1") {
        let key = key.replace("final_layer.adaLN_modulation.1", "norm_out.linear");
        return (vec![key], Split::SwapHalves);
    }
    (vec![key], Split::Whole)
}

/// Whether a module name (prefix removed) is in the original HunyuanVideo layout.
pub(super) fn is_original(module: &str) -> bool {
    const ROOTS: &[&str] = &[
        "double_blocks.",
        "single_blocks.",
        "final_layer.",
        "txt_in.",
        "time_in.",
        "vector_in.",
        "guidance_in.",
        "img_in.",
    ];
    ROOTS.iter().any(|r| module.starts_with(r))
}

/// The Kohya prefix of every transformer module name (`lora_unet_double_blocks_0_img_attn_qkv`).
pub(super) const KOHYA_PREFIX: &str = "lora_unet_";

/// The original-layout module of a Kohya name without [`KOHYA_PREFIX`]: every `_` becomes `.`,
/// then musubi-tuner's fix-ups for HunyuanVideo's blocks restore the underscores of
/// `double_blocks`, `single_blocks`, `img_*`, `txt_*` and `attn_*`. Names outside the blocks get
/// no fix-up (musubi-tuner trains only the blocks), so they match no layer.
pub(super) fn kohya_to_original(name: &str) -> String {
    let module = name.replace('_', ".");
    if module.contains("double.blocks.") || module.contains("single.blocks.") {
        module
            .replace("double.blocks.", "double_blocks.")
            .replace("single.blocks.", "single_blocks.")
            .replace("img.", "img_")
            .replace("txt.", "txt_")
            .replace("attn.", "attn_")
    } else {
        module
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(module: &str) -> String {
        let (t, s) = original_to_diffusers(module);
        assert_eq!((t.len(), s), (1, Split::Whole), "{module}");
        t[0].clone()
    }

    /// Names as diffusers' converter writes them (its output for each key, by running
    /// `_convert_hunyuan_video_lora_to_diffusers` on a dict with these keys).
    #[test]
    fn original_names_map_as_diffusers_maps_them() {
        for (orig, want) in [
            (
                "double_blocks.3.img_attn_proj",
                "transformer_blocks.3.attn.to_out.0",
            ),
            (
                "double_blocks.3.txt_attn_proj",
                "transformer_blocks.3.attn.to_add_out",
            ),
            (
                "double_blocks.0.img_mod.linear",
                "transformer_blocks.0.norm1.linear",
            ),
            (
                "double_blocks.0.txt_mod.linear",
                "transformer_blocks.0.norm1_context.linear",
            ),
            (
                "double_blocks.0.img_mlp.fc1",
                "transformer_blocks.0.ff.net.0.proj",
            ),
            (
                "double_blocks.0.txt_mlp.fc2",
                "transformer_blocks.0.ff_context.net.2",
            ),
            (
                "single_blocks.1.linear2",
                "single_transformer_blocks.1.proj_out",
            ),
            (
                "single_blocks.1.modulation.linear",
                "single_transformer_blocks.1.norm.linear",
            ),
            ("final_layer.linear", "proj_out"),
            (
                "time_in.mlp.2",
                "time_text_embed.timestep_embedder.linear_2",
            ),
            (
                "guidance_in.mlp.0",
                "time_text_embed.guidance_embedder.linear_1",
            ),
            (
                "vector_in.in_layer",
                "time_text_embed.text_embedder.linear_1",
            ),
            ("txt_in.input_embedder", "context_embedder.proj_in"),
            (
                "txt_in.t_embedder.mlp.0",
                "context_embedder.time_text_embed.timestep_embedder.linear_1",
            ),
            (
                "txt_in.c_embedder.linear_2",
                "context_embedder.time_text_embed.text_embedder.linear_2",
            ),
            (
                "txt_in.individual_token_refiner.blocks.0.mlp.fc1",
                "context_embedder.token_refiner.refiner_blocks.0.ff.net.0.proj",
            ),
            (
                "txt_in.individual_token_refiner.blocks.0.self_attn_proj",
                "context_embedder.token_refiner.refiner_blocks.0.attn.to_out.0",
            ),
            (
                "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1",
                "context_embedder.token_refiner.refiner_blocks.0.norm_out.linear",
            ),
        ] {
            assert_eq!(one(orig), want);
        }
        let (t, s) = original_to_diffusers("double_blocks.2.txt_attn_qkv");
        assert_eq!(s, Split::Rows);
        assert_eq!(
            t,
            [
                "transformer_blocks.2.attn.add_q_proj",
                "transformer_blocks.2.attn.add_k_proj",
                "transformer_blocks.2.attn.add_v_proj"
            ]
        );
        let (t, s) = original_to_diffusers("single_blocks.0.linear1");
        assert_eq!(s, Split::Rows);
        assert_eq!(
            t,
            [
                "single_transformer_blocks.0.attn.to_q",
                "single_transformer_blocks.0.attn.to_k",
                "single_transformer_blocks.0.attn.to_v",
                "single_transformer_blocks.0.proj_mlp"
            ]
        );
        let (t, s) =
            original_to_diffusers("txt_in.individual_token_refiner.blocks.1.self_attn_qkv");
        assert_eq!(s, Split::Rows);
        assert_eq!(
            t[2],
            "context_embedder.token_refiner.refiner_blocks.1.attn.to_v"
        );
        let (t, s) = original_to_diffusers("final_layer.adaLN_modulation.1");
        assert_eq!(
            (t, s),
            (vec!["norm_out.linear".to_string()], Split::SwapHalves)
        );
        // a conv (img_in) maps to a name no linear has
        assert_eq!(one("img_in.proj"), "x_embedder.proj");
    }

    #[test]
    fn kohya_names_recover_their_modules_as_musubi_tuner_does() {
        for (kohya, want) in [
            (
                "double_blocks_0_img_attn_qkv",
                "double_blocks.0.img_attn_qkv",
            ),
            (
                "double_blocks_12_txt_attn_proj",
                "double_blocks.12.txt_attn_proj",
            ),
            ("double_blocks_0_img_mlp_fc1", "double_blocks.0.img_mlp.fc1"),
            (
                "double_blocks_0_txt_mod_linear",
                "double_blocks.0.txt_mod.linear",
            ),
            ("single_blocks_3_linear1", "single_blocks.3.linear1"),
            (
                "single_blocks_3_modulation_linear",
                "single_blocks.3.modulation.linear",
            ),
            ("final_layer_linear", "final.layer.linear"),
        ] {
            assert_eq!(kohya_to_original(kohya), want);
        }
        assert!(is_original("double_blocks.0.img_attn_qkv"));
        assert!(!is_original("transformer_blocks.0.attn.to_q"));
    }
}
