"""Fake `modules.processing`: a `p` with the attributes extensions touch, and a driver running one generation in
the host's order (host-contract §2.3, §6.6, §10.4): per batch parse → activate → setup_conds (cached) → sample,
then the hires pass, then deactivate only under the host's condition. `observe(phase, p)` sees the model as the
sampler would (after Forge's refresh_loras). Sampling runs `p.steps` steps (the hires pass `hr_second_pass_steps` or
`p.steps`) through a CFGDenoiser-like object that calls the host's `cfg_denoiser` callbacks on every model call
(two per step for second-order samplers, one on the last), with the host's lagging `state.sampling_step`."""

from dataclasses import dataclass, field


from modules import extra_networks, infotext_utils, script_callbacks, shared

SECOND_ORDER = ("Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE")


def fingerprint(tensors) -> float:
    """A number that changes with any weight: Σ_i (i+1)·Σ t_i in float64, over tensors sorted by name."""
    return float(sum((i + 1) * t.detach().double().sum() for i, (_, t) in enumerate(sorted(tensors.items()))))


class StableDiffusionProcessing:
    cached_c = [None, None]
    cached_uc = [None, None]

    def __init__(self, prompt="", negative_prompt="", batch_size=1, n_iter=1, seed=1, sd_model=None, scripts=None,
                 disable_extra_networks=False, enable_hr=False, hr_prompt=None, steps=2, sampler_name="Euler",
                 hr_second_pass_steps=0):
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.seed = seed
        self.steps = steps
        self.sampler_name = sampler_name
        self.hr_second_pass_steps = hr_second_pass_steps
        self.sd_model = sd_model if sd_model is not None else shared.sd_model
        self.scripts = scripts
        self.script_args = []
        self.disable_extra_networks = disable_extra_networks
        self.enable_hr = enable_hr
        self.hr_prompt = hr_prompt if hr_prompt is not None else prompt
        self.extra_generation_params = {}
        self.comments = {}
        self.is_hr_pass = False
        self.iteration = 0
        self.extra_network_data = None
        self.hr_extra_network_data = None
        self.prompts = self.negative_prompts = self.hr_prompts = None
        self.seeds = self.subseeds = None
        self.all_prompts = self.all_negative_prompts = self.all_hr_prompts = None
        self.c = self.hr_c = None

    def comment(self, text):
        self.comments[text] = 1


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_c = [None, None]
    cached_hr_uc = [None, None]


@dataclass
class Processed:
    infotexts: list = field(default_factory=list)
    comments: str = ""
    conds: list = field(default_factory=list)


def _as_list(v, n):
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def _text_encoder_tensors(sd_model) -> dict:
    if hasattr(sd_model, "forge_objects"):
        from backend import memory_management
        clip = sd_model.forge_objects.clip
        memory_management.load_model_gpu(clip.patcher)
        return dict(clip.cond_stage_model.state_dict())
    te = sd_model.conditioner if getattr(sd_model, "is_sdxl", False) else sd_model.cond_stage_model
    return dict(te.state_dict())


def _conds(p, prompts, cache, data):
    """The host's get_conds_with_caching: reuse when the key (prompts, networks, model) equals the cached one."""
    key = (tuple(prompts), repr([(k, [x.items for x in v]) for k, v in sorted((data or {}).items())]),
           id(p.sd_model))
    if shared.opts.persistent_cond_cache and cache[0] is not None and cache[0] == key:
        return cache[1]
    value = fingerprint(_text_encoder_tensors(p.sd_model))
    cache[0], cache[1] = key, value
    return value


class CFGDenoiser:
    """What the host's sampler hands each cfg_denoiser callback: `p`, the model-call counter `step`, the steps of
    this pass and the expected number of calls (`total_steps`: twice the steps for second-order samplers)."""

    def __init__(self, p, steps: int, second_order: bool):
        self.p = p
        self.step = 0
        self.steps = steps
        self.total_steps = steps * 2 if second_order else steps


def _sample(p, observe, phase, observe_step=None):
    sd = p.sd_model
    if hasattr(sd, "forge_objects"):
        from backend import memory_management
        sd.forge_objects = sd.forge_objects_after_applying_lora.shallow_copy()
        memory_management.load_models_gpu([sd.forge_objects.unet])
    steps = (p.hr_second_pass_steps or p.steps) if phase == "hires" else p.steps
    second_order = p.sampler_name in SECOND_ORDER
    denoiser = CFGDenoiser(p, steps, second_order)
    shared.state.sampling_steps, shared.state.sampling_step = steps, 0
    for i in range(steps):
        for _ in range(2 if second_order and i < steps - 1 else 1):
            params = script_callbacks.CFGDenoiserParams(None, None, None, shared.state.sampling_step,
                                                        shared.state.sampling_steps, None, None, denoiser)
            script_callbacks.cfg_denoiser_callback(params)
            if observe and denoiser.step == 0:
                observe(phase, p)
            if observe_step:
                observe_step(phase, i, p)
            denoiser.step += 1
        shared.state.sampling_step = i  # the sampler's step callback runs after the step's model calls


def create_infotext(p):
    params = {"Steps": p.steps, "Seed": p.seed}
    params.update(p.extra_generation_params)
    return f"{p.prompt}\nNegative prompt: {p.negative_prompt}\n" + infotext_utils.create_infotext_line(params)


def process_images(p, observe=None, observe_step=None) -> Processed:
    n = p.batch_size * p.n_iter
    p.all_prompts = _as_list(p.prompt, n)
    p.all_negative_prompts = _as_list(p.negative_prompt, n)
    p.all_hr_prompts = _as_list(p.hr_prompt, n)
    res = Processed()
    sd = p.sd_model
    forge = hasattr(sd, "forge_objects")
    for it in range(p.n_iter):
        p.iteration = it
        sl = slice(it * p.batch_size, (it + 1) * p.batch_size)
        p.prompts, p.negative_prompts = p.all_prompts[sl], p.all_negative_prompts[sl]
        p.seeds = p.subseeds = [p.seed + i for i in range(sl.start, sl.stop)]
        if forge:
            sd.forge_objects = sd.forge_objects_original.shallow_copy()
        p.prompts, p.extra_network_data = extra_networks.parse_prompts(p.prompts)
        if p.enable_hr:
            p.hr_prompts, p.hr_extra_network_data = extra_networks.parse_prompts(p.all_hr_prompts[sl])
        if not p.disable_extra_networks:
            extra_networks.activate(p, p.extra_network_data)
        if forge:
            sd.forge_objects = sd.forge_objects_after_applying_lora.shallow_copy()
        p.c = _conds(p, p.prompts, p.cached_c, p.extra_network_data)
        res.conds.append(("first_pass", p.c))
        _sample(p, observe, "first_pass", observe_step)
        if p.enable_hr:
            p.is_hr_pass = True
            if not p.disable_extra_networks:
                extra_networks.activate(p, p.hr_extra_network_data)
            if forge:
                sd.forge_objects = sd.forge_objects_after_applying_lora.shallow_copy()
            p.hr_c = _conds(p, p.hr_prompts, p.cached_hr_c, p.hr_extra_network_data)
            res.conds.append(("hires", p.hr_c))
            _sample(p, observe, "hires", observe_step)
            p.is_hr_pass = False
        res.infotexts.extend(create_infotext(p) for _ in range(p.batch_size))
    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    res.comments = "\n".join(p.comments)
    return res
