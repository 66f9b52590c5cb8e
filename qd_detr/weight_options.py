"""Options versus weights: infer a bare state dict's options from its shapes, check stated options against them.

``info`` is ``qd_detr.keys.describe_state_dict``'s reading of the (renamed) state dict.
"""
from .config import fusion_layout, fusion_variant, gate_options, make_options
from .errors import CheckpointError, ConfigError

__all__ = ["infer_options", "check_options_against_weights"]


def infer_options(sd, info, given, path):
    """Options for a bare state dict: shapes where they tell, ``given`` for the rest."""
    need = []

    def dim(key, axis=0):
        return int(sd[key].shape[axis]) if key in sd else None

    opt = make_options(
        hidden_dim=info["hidden_dim"], enc_layers=info["enc_layers"], dec_layers=info["dec_layers"],
        n_input_proj=info["n_input_proj"] or 2, num_queries=dim("query_embed.weight"),
        dim_feedforward=dim("transformer.encoder.layers.0.linear1.weight"),
        max_q_l=dim("txt_position_embed.position_embeddings.weight") or 32,
        t_feat_dim=dim("input_txt_proj.0.LayerNorm.weight"),
        span_loss_type="l1" if dim("span_embed.layers.2.weight") == 2 else "ce",
        contrastive_align_loss="contrastive_align_projection_query.weight" in sd,
        contrastive_hdim=dim("contrastive_align_projection_query.weight") or 64,
        fusion_layers=info["fusion_layers"] or 4,
    )
    layout = info["layout"]
    if layout == "custom":
        opt.use_avigate_custom, opt.a_feat_dir = True, given.get("a_feat_dir", "<audio>")
        opt.v_feat_dim = dim("input_vid_proj.0.LayerNorm.weight")
        opt.a_feat_dim = dim("input_aud_proj.0.LayerNorm.weight")
        if info["gating_shape"] in ("elementwise", "global_diagstrip_ssm"):
            opt.gating_type = info["gating_shape"]
        elif "gating_type" not in given:
            need.append("gating_type (global and clipwise weights have identical names and shapes, so the "
                        "weights cannot tell them apart; pass --gating_type global or --gating_type clipwise)")
        if "fusion_n_heads" not in given:
            need.append("fusion_n_heads (the number of fusion attention heads changes no weight shape; "
                        "pass --fusion_n_heads N)")
        if info["variant_from_weights"] == "v2":
            opt.ffn_gate_film = info["film"]
            if "mha_gate_temp" not in given:
                need.append("mha_gate_temp (v2 gating: the sigmoid temperature is not a weight; pass "
                            "--mha_gate_temp T, the value the model was trained with)")
        if info["gating_shape"] == "global_diagstrip_ssm":
            ssm = info["ssm"]
            opt.ssm_band_width, opt.ssm_enc_channels = ssm["band_width"], ssm["enc_channels"]
            opt.ssm_use_video_branch = int(ssm["use_video_branch"])
            for key, flag in (("ssm_dilations", "--ssm_dilations D1 D2 ..."),
                              ("ssm_diag_subtract", "--ssm_diag_subtract X")):
                if key not in given:
                    need.append(f"{key} (the SSM gate's {key[4:]} changes no weight shape; pass {flag})")
    elif layout == "avigate":
        opt.use_avigate, opt.a_feat_dir = True, given.get("a_feat_dir", "<audio>")
        opt.v_feat_dim, opt.a_feat_dim = dim("fusion.video_proj.weight", 1), dim("fusion.audio_proj.weight", 1)
    elif layout == "concat or video_only":
        total = dim("input_vid_proj.0.LayerNorm.weight")
        if "a_feat_dim" in given:
            opt.a_feat_dir = given.get("a_feat_dir", "<audio>")
            opt.v_feat_dim = total - int(given["a_feat_dim"])
        else:
            opt.v_feat_dim = total
    else:
        raise CheckpointError(f"{path}: fusion weights of an unknown layout")
    if "nheads" not in given:
        need.append("nheads (the number of transformer attention heads changes no weight shape; pass --nheads N)")
    if need:
        raise ConfigError(f"{path}: a bare state dict without options; cannot infer " + "; ".join(need)
                          + ". Put the training opt.json beside the checkpoint, or give these options")
    for key, value in given.items():
        setattr(opt, key, value)
    return opt


def check_options_against_weights(opt, info, path):
    """Stated options that contradict the weights (layout, gating shape, variant, FiLM, SSM shapes, fusion
    layers) are a CheckpointError naming both."""
    layout = fusion_layout(opt)
    expected = {"custom": "custom", "avigate": "avigate"}.get(layout, "concat or video_only")
    if info["layout"] != expected:
        raise CheckpointError(f"{path}: options describe the {layout} layout but the weights are of the "
                              f"{info['layout']} layout")
    if layout == "custom":
        for shape in ("elementwise", "global_diagstrip_ssm"):
            if (opt.gating_type == shape) != (info["gating_shape"] == shape):
                raise CheckpointError(f"{path}: options say gating_type={opt.gating_type} but the gating weights "
                                      f"are {info['gating_shape']}-shaped")
        variant = fusion_variant(opt)
        from_weights = info["variant_from_weights"]
        if (variant == "v2") != (from_weights == "v2"):
            said = "v2 gate options (mha_gate_temp, ...)" if variant == "v2" else "no v2 gate options"
            raise CheckpointError(f"{path}: the options have {said} but the weights are of the "
                                  f"{'v2' if from_weights == 'v2' else 'v1/diagstrip'} gating layout "
                                  f"(v2 adds gating_function.mha_bias/mha_scale/ffn_alpha)")
        if variant == "v2" and bool(getattr(opt, "ffn_gate_film", False)) != info["film"]:
            raise CheckpointError(f"{path}: options say ffn_gate_film={getattr(opt, 'ffn_gate_film', False)} but the "
                                  f"weights {'have' if info['film'] else 'lack'} the FiLM shift "
                                  "(gating_function.ffn_beta)")
        if info.get("ssm"):
            ssm, (built, _) = info["ssm"], gate_options(opt)
            for key in ("band_width", "enc_channels", "use_video_branch"):
                if built["ssm"][key] != ssm[key]:
                    raise CheckpointError(f"{path}: options say ssm_{key}={built['ssm'][key]} but the SSM gate "
                                          f"weights have {key} {ssm[key]}")
            if len(built["ssm"]["dilations"]) != ssm["n_dilations"]:
                raise CheckpointError(f"{path}: options give {len(built['ssm']['dilations'])} SSM dilations "
                                      f"{list(built['ssm']['dilations'])} but the weights have {ssm['n_dilations']}")
        if int(opt.fusion_layers) != info["fusion_layers"]:
            raise CheckpointError(f"{path}: options say fusion_layers={opt.fusion_layers} but the weights have "
                                  f"{info['fusion_layers']} fusion layers")
