"""Fake `modules.extra_networks`, reimplementing host-contract §2 (registry, params split, activate order)."""

import logging
import re
from collections import defaultdict

from modules import errors

extra_network_registry: dict = {}
extra_network_aliases: dict = {}
re_extra_net = re.compile(r"<(\w+):([^>]+)>")


def initialize():
    extra_network_registry.clear()
    extra_network_aliases.clear()


def register_extra_network(extra_network):
    extra_network_registry[extra_network.name] = extra_network


def register_extra_network_alias(extra_network, alias):
    extra_network_aliases[alias] = extra_network


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)

    def __eq__(self, other):
        return self.items == other.items


class ExtraNetwork:
    def __init__(self, name):
        self.name = name

    def activate(self, p, params_list):
        raise NotImplementedError

    def deactivate(self, p):
        raise NotImplementedError


def lookup_extra_networks(extra_network_data):
    res = {}
    for extra_network_name, extra_network_args in list(extra_network_data.items()):
        extra_network = extra_network_registry.get(extra_network_name, None)
        alias = extra_network_aliases.get(extra_network_name, None)
        if alias is not None and extra_network is None:
            extra_network = alias
        if extra_network is None:
            logging.info(f"Skipping unknown extra network: {extra_network_name}")
            continue
        res.setdefault(extra_network, []).extend(extra_network_args)
    return res


def activate(p, extra_network_data):
    activated = []
    for extra_network, extra_network_args in lookup_extra_networks(extra_network_data).items():
        try:
            extra_network.activate(p, extra_network_args)
            activated.append(extra_network)
        except Exception as e:
            errors.display(e, f"activating extra network {extra_network.name} with arguments {extra_network_args}")
    for extra_network_name, extra_network in extra_network_registry.items():
        if extra_network in activated:
            continue
        try:
            extra_network.activate(p, [])
        except Exception as e:
            errors.display(e, f"activating extra network {extra_network_name}")
    if getattr(p, "scripts", None) is not None:
        p.scripts.after_extra_networks_activate(p, batch_number=p.iteration, prompts=p.prompts, seeds=p.seeds,
                                                subseeds=p.subseeds, extra_network_data=extra_network_data)


def deactivate(p, extra_network_data):
    data = lookup_extra_networks(extra_network_data)
    for extra_network in data:
        try:
            extra_network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating extra network {extra_network.name}")
    for extra_network_name, extra_network in extra_network_registry.items():
        if extra_network in data:
            continue
        try:
            extra_network.deactivate(p)
        except Exception as e:
            errors.display(e, f"deactivating unmentioned extra network {extra_network_name}")


def parse_prompt(prompt):
    """Every <name:args> tag is removed from the text (known or not); args split on every ':'."""
    found = defaultdict(list)
    for m in re_extra_net.finditer(prompt):
        found[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
    return re_extra_net.sub("", prompt), found


def parse_prompts(prompts):
    res = []
    extra_data = None
    for prompt in prompts:
        updated_prompt, parsed = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed
        res.append(updated_prompt)
    return res, extra_data


def get_user_metadata(filename, lister=None):
    import json
    import os
    if filename is None:
        return {}
    metadata_filename = os.path.splitext(filename)[0] + ".json"
    if not os.path.isfile(metadata_filename):
        return {}
    try:
        with open(metadata_filename, encoding="utf8") as f:
            return json.load(f)
    except Exception as e:
        errors.display(e, f"reading extra network user metadata from {metadata_filename}")
        return {}
