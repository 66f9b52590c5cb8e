"""What an in-memory model states about itself through attributes: the options its weight shapes cannot tell.

``describe_object`` finds the QD-DETR model (or bare fusion module) inside a wrapper;
``module_options`` reads head counts, dropout, flags and, for the custom fusion, the v2 and
diagstrip SSM gate settings (``gate_config``) from module attributes, checked against the weights.
"""
from torch import nn

from qd_detr.errors import ConfigError, IncompatibleModelError
from qd_detr.keys import describe_state_dict

__all__ = ["child_module", "describe_object", "attention_heads", "module_options", "layer_value", "ssm_dilations",
           "gate_config"]


def child_module(module, name):
    """The registered child ``name`` of ``module`` (no attribute lookup), or None."""
    return module._modules.get(name) if isinstance(module, nn.Module) else None


def describe_object(model):
    """(inner module, kind "model"/"fusion", fusion module or None, fusion attribute name, wrapper name)."""
    wrapper = None
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        wrapper, model = type(model).__name__, model.module
    if not isinstance(model, nn.Module):
        raise IncompatibleModelError(f"expected a torch.nn.Module, got a {type(model).__name__}")
    for name in ("fusion", "avigate_fusion"):
        fusion = child_module(model, name)
        if fusion is not None:
            return model, "model", fusion, name, wrapper
    if isinstance(child_module(model, "fusion_layers"), nn.ModuleList):
        return model, "fusion", model, None, wrapper
    if child_module(model, "transformer") is not None and child_module(model, "input_txt_proj") is not None:
        return model, "model", None, None, wrapper
    raise IncompatibleModelError(
        f"{type(model).__name__}: neither a QD-DETR model (with a .fusion or .avigate_fusion module) nor a "
        "fusion module (with .fusion_layers)")


def attention_heads(module):
    """``num_heads`` of an ``nn.MultiheadAttention``, else None."""
    return getattr(module, "num_heads", None) if isinstance(module, nn.MultiheadAttention) else None


def module_options(user, fusion, layout, sd, options=None):
    """Options the user's modules state through attributes (what shapes cannot tell).

    ``options``: values given by the caller; they fill what no attribute holds and must agree with
    what one does. Returns ({option: value}, {option: source}).
    """
    given, where = {}, {}

    def put(key, value, source):
        if value is not None:
            given[key], where[key] = value, source

    block = fusion.fusion_layers[0]
    put("fusion_n_heads", attention_heads(child_module(block, "self_attention")),
        "fusion_layers[0].self_attention.num_heads")
    transformer = child_module(user, "transformer")
    if transformer is not None:
        nhead = getattr(transformer, "nhead", None)
        if nhead is None:
            nhead = next((m.num_heads for m in transformer.modules() if isinstance(m, nn.MultiheadAttention)), None)
        put("nheads", nhead, "transformer.nhead")
        drop = next((m.p for m in transformer.modules() if isinstance(m, nn.Dropout)), None)
        put("dropout", drop, "first nn.Dropout of the transformer")
    for attr in ("use_txt_pos", "aux_loss", "max_v_l", "span_loss_type"):
        value = getattr(user, attr, None)
        if isinstance(value, (bool, int, str)):
            put(attr, value, f"{type(user).__name__}.{attr}")
    proj = child_module(user, "input_txt_proj")
    try:
        put("input_dropout", float(proj[0].net[0].p), "input_txt_proj[0].net[0].p")
    except (AttributeError, IndexError, TypeError):
        pass
    if layout == "avigate":
        heads = attention_heads(child_module(block, "cross_attention"))
        if heads is not None and heads != 8:
            raise IncompatibleModelError(f"the older AVIGATEFusion layout has 8 attention heads; this module "
                                         f"has {heads}")
    if layout == "custom":
        values, sources = gate_config(fusion, sd, options or {})
        given.update(values)
        where.update(sources)
    for key, value in (options or {}).items():
        if key in given and given[key] != value:
            raise ConfigError(f"option {key}={value!r} was given but the module has {key}={given[key]!r} "
                              f"({where[key]})")
        if key not in given:
            given[key], where[key] = value, "given (options)"
    return given, where


def layer_value(fusion, path, attr):
    """``attr`` of the module at ``path`` (child names) in every fusion layer: (value, source) or (None, None).

    Our rebuild uses one value for all layers, so layers that disagree are an IncompatibleModelError.
    """
    found = []
    for block in fusion.fusion_layers:
        obj = block
        for name in path:
            obj = child_module(obj, name)
        value = getattr(obj, attr, None) if obj is not None else None
        found.append(value)
    if all(v is None for v in found):
        return None, None
    if any(v != found[0] for v in found):
        raise IncompatibleModelError(f"fusion layers differ in {'.'.join(path + (attr,))} ({found}); the rebuilt "
                                     "fusion has one value for every layer")
    return found[0], f"fusion_layers[*].{'.'.join(path + (attr,))}"


def ssm_dilations(fusion):
    """Dilations of the SSM gate's 3-tap encoder convolutions in every layer: (list, source) or (None, None)."""
    found = []
    for block in fusion.fusion_layers:
        encoder = child_module(child_module(child_module(block, "gating_function"), "ssm_gate"), "encoder")
        if encoder is None:
            return None, None
        found.append([int(m.dilation[0]) for m in encoder.modules()
                      if isinstance(m, nn.Conv1d) and m.kernel_size[0] == 3])
    if any(d != found[0] for d in found):
        raise IncompatibleModelError(f"fusion layers differ in their SSM dilations ({found}); the rebuilt fusion "
                                     "has one value for every layer")
    return found[0], "fusion_layers[*].gating_function.ssm_gate.encoder Conv1d(kernel 3).dilation"


def gate_config(fusion, sd, options):
    """Gate options of a custom fusion that its weights cannot (fully) tell, read from module attributes.

    v2: ``mha_gate_temp`` (``gating_function.mha_temp``, a float), ``ffn_gate_film`` (``ffn_film``,
    checked against the ``ffn_beta`` weights). diagstrip SSM: band width and video branch (checked
    against the weight shapes), channels (weights), dilations (the encoder's convolutions) and
    ``diag_subtract``. What no attribute holds comes from ``options``, else it is a ConfigError.
    Returns ({option: value}, {option: source}).
    """
    info = describe_state_dict(sd)
    values, sources = {}, {}

    def put(key, value, source, weights=None, weights_source=None):
        if value is None and key in options:
            value, source = options[key], "given (options)"
        if value is None:
            value, source = weights, weights_source
        if weights is not None and value != weights:
            raise IncompatibleModelError(f"{source} says {key}={value!r} but the weights have {weights!r} "
                                         f"({weights_source})")
        if value is not None:
            values[key] = value
            sources[key] = source if weights is None or source == weights_source else \
                f"{source}, agrees with the {weights_source}"

    if info["variant_from_weights"] == "v2":
        temp, where = layer_value(fusion, ("gating_function",), "mha_temp")
        put("mha_gate_temp", None if temp is None else float(temp), where)
        if "mha_gate_temp" not in values:
            raise ConfigError("v2 gating: the sigmoid temperature is no weight and no gating function has an "
                              "mha_temp attribute; pass options={'mha_gate_temp': T}, the value it was trained with")
        film, where = layer_value(fusion, ("gating_function",), "ffn_film")
        if film is None:
            film, where = layer_value(fusion, (), "ffn_film")
        put("ffn_gate_film", None if film is None else bool(film), where, bool(info["film"]),
            "weights (gating_function.ffn_beta " + ("present)" if info["film"] else "absent)"))
    elif info["variant_from_weights"] == "diagstrip":
        shapes, gate = info["ssm"], ("gating_function", "ssm_gate")
        width, where = layer_value(fusion, gate, "band_width")
        put("ssm_band_width", None if width is None else int(width), where, shapes["band_width"],
            "weights (ssm_gate.encoder.net.0 has 2w+1 input channels)")
        put("ssm_enc_channels", None, None, shapes["enc_channels"], "weights (ssm_gate.encoder.net.0 output channels)")
        video, where = layer_value(fusion, gate, "use_video_branch")
        put("ssm_use_video_branch", None if video is None else int(bool(video)), where,
            int(shapes["use_video_branch"]), "weights (ssm_gate.norm is 2C wide with the video branch, C without)")
        dilations, where = ssm_dilations(fusion)
        if dilations is None:
            dilations, where = layer_value(fusion, gate, "dilations")
        put("ssm_dilations", None if dilations is None else [int(d) for d in dilations], where)
        if "ssm_dilations" not in values:
            raise ConfigError("the SSM gate's dilations change no weight shape and no encoder convolution was "
                              "found; pass options={'ssm_dilations': [...]}")
        if len(values["ssm_dilations"]) != shapes["n_dilations"]:
            raise IncompatibleModelError(f"the SSM gate has {shapes['n_dilations']} dilated convolutions but "
                                         f"{len(values['ssm_dilations'])} dilations were found "
                                         f"({sources['ssm_dilations']})")
        sub, where = layer_value(fusion, gate, "diag_subtract")
        put("ssm_diag_subtract", None if sub is None else float(sub), where)
        if "ssm_diag_subtract" not in values:
            raise ConfigError("the SSM gate's diag_subtract is no weight and no ssm_gate has a diag_subtract "
                              "attribute; pass options={'ssm_diag_subtract': X}")
    return values, sources
