// sd-webui-adapters: the adapter cards' behaviour on the extra-networks page.
// A click toggles `<lora:name:unet[:te][:unet=schedule][:lbw=…]>` (plus activation text) in the prompt; cards whose adapter is in the
// prompt carry `adapters-active`, kept in sync as the prompt is edited; small inputs on a card rewrite its tag.
// Everything shown from metadata goes through textContent, never innerHTML.
(function(root) {
    "use strict";

    // Tags are read as lib_adapters reads them (lib_adapters/tags.py, tag_options.py): a linear scan for
    // `<lora:`/`<lyco:` up to the next `>`, arguments split at `:`, numbers strictly decimal and finite.
    var NAMED = ["unet", "te", "hr", "hrunet", "hrte", "lbw", "x", "start", "stop", "step", "dyn", "lbwe"];
    var NUMBER = /^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$/;

    function fmt(x) {
        // the shortest decimal text, as lib_adapters.cards.format_strength
        var t = Number(Number(x).toFixed(4)).toString();
        return t === "-0" ? "0" : t;
    }

    function tagText(name, unet, te, order, lbw, schedule) {
        // as lib_adapters.cards.tag_text: the card's preferred UNet schedule and block weights go last, named
        var extra = (schedule ? ":unet=" + schedule : "") + (lbw ? ":lbw=" + lbw : "");
        if (Number(unet) === Number(te)) return "<lora:" + name + ":" + fmt(unet) + extra + ">";
        var first = order === "te,unet" ? te : unet;
        var second = order === "te,unet" ? unet : te;
        return "<lora:" + name + ":" + fmt(first) + ":" + fmt(second) + extra + ">";
    }

    function scan(text) {
        // every tag as {start, end, kind, body}, in one pass: a start without a later `>` ends the scan
        var out = [], start = /<(lora|lyco):/g, pos = 0, m;
        for (;;) {
            start.lastIndex = pos;
            if ((m = start.exec(text)) === null) return out;
            var from = m.index + m[0].length, end = text.indexOf(">", from);
            if (end < 0) return out;
            out.push({start: m.index, end: end + 1, kind: m[1], body: text.slice(from, end)});
            pos = end + 1;
        }
    }

    function splitArgs(body) {
        // [name, [{key|null, value, raw}]] as lib_adapters.tags.split_args
        var parts = body.split(":"), args = [];
        parts.slice(1).forEach(function(raw) {
            var eq = raw.indexOf("=");
            if (eq >= 0) args.push({key: raw.slice(0, eq).trim(), value: raw.slice(eq + 1).trim(), raw: raw});
            else if (raw.trim()) args.push({key: null, value: raw.trim(), raw: raw});
        });
        return [parts[0].trim(), args];
    }

    function number(text) {
        // a finite decimal number, or null (lib_adapters.tags.number)
        var t = String(text).trim();
        if (!NUMBER.test(t)) return null;
        var v = Number(t);
        return isFinite(v) ? v : null;
    }

    function strength(text) {
        // a number, or "schedule:<text>" for a `w@step,…` schedule (lib_adapters.schedules.parse_strength); null if malformed
        if (!/[@~,;]/.test(text)) return number(text);
        var points = [], items = text.split(/[,;]/);
        for (var i = 0; i < items.length; i++) {
            var parts = items[i].split(/[@~]/);
            if (!items[i].trim() || parts.length > 2) return null;
            var step = parts.length === 2 ? number(parts[1]) : 1, w = number(parts[0]);
            if (step === null || w === null) return null;
            points.push([step, w]);
        }
        points.sort(function(a, b) { return a[0] - b[0]; });
        if (points[0][0] < 0) return null;
        var same = points.every(function(p) { return p[1] === points[0][1]; });
        return same ? points[0][1] : "schedule:" + text.trim();
    }

    function stepNumber(text) {
        var n = number(text);
        return n !== null && n >= 0 && n === Math.floor(n) ? n : null;
    }

    function parseTagBody(body, order, dflt) {
        // {name, unet, te, error} as lib_adapters.tag_options reads the arguments; a scheduled strength is
        // "schedule:<text>", one limited to a step window "window"; `error` names what is malformed
        var split = splitArgs(body), positional = [], named = {}, error = "";
        split[1].forEach(function(arg) {
            if (error) return;
            if (arg.key === null) {
                var v = strength(arg.value);
                if (v === null) error = arg.value + " is not a number";
                positional.push(v);
            } else if (NAMED.indexOf(arg.key) < 0) {
                error = "unknown argument " + arg.key;
            } else {
                named[arg.key] = arg.value;
            }
        });
        if (!error && positional.length > 2) error = "at most two strengths";
        if (!error && "lbwe" in named) error = "lbwe= is not supported";
        var unet = dflt, te = dflt;
        if (positional.length === 1) {
            unet = te = positional[0];
        } else if (positional.length === 2) {
            unet = order === "te,unet" ? positional[1] : positional[0];
            te = order === "te,unet" ? positional[0] : positional[1];
        }
        ["unet", "te", "hr", "hrunet", "hrte", "x"].forEach(function(key) {
            if (error || !(key in named)) return;
            var v = key === "x" ? number(named[key]) : strength(named[key]);
            if (v === null) error = key + "=" + named[key] + " is not a number";
            else if (key === "unet") unet = v;
            else if (key === "te") te = v;
        });
        var start = 0, stop = null;
        if (!error && "start" in named && (start = stepNumber(named.start)) === null) error = "start= is not a step";
        if (!error && "stop" in named && (stop = stepNumber(named.stop)) === null) error = "stop= is not a step";
        if (!error && "step" in named) {
            var dash = named.step.indexOf("-");
            start = dash < 0 ? null : stepNumber(named.step.slice(0, dash));
            stop = dash < 0 ? null : stepNumber(named.step.slice(dash + 1));
            if (start === null || stop === null) error = "step= is not a range a-b";
        }
        if (!error && stop !== null && stop <= start) error = "the adapter would act on no step";
        if (!error && (start || stop !== null)) unet = "window";
        return {name: split[0], unet: error ? NaN : unet, te: error ? NaN : te, error: error};
    }

    function findTags(text, order, dflt) {
        return scan(text).map(function(t) {
            var parsed = parseTagBody(t.body, order, dflt === undefined ? 1 : dflt);
            parsed.start = t.start;
            parsed.end = t.end;
            parsed.body = t.body;
            return parsed;
        });
    }

    function sameName(a, b, fold) {
        // exact, or ignoring case where no other card differs only in case (the name index resolves it then)
        return a === b || (!!fold && a.toLowerCase() === b.toLowerCase());
    }

    function hasTag(text, name, fold) {
        return findTags(text).some(function(t) {
            return sameName(t.name, name, fold);
        });
    }

    function removeTag(text, name, activation, sep, fold) {
        // every tag of `name`, the activation text right after it and the separator before it
        sep = sep === undefined ? " " : sep;
        var tags = findTags(text).filter(function(t) {
            return sameName(t.name, name, fold);
        });
        for (var i = tags.length - 1; i >= 0; i--) {
            var start = tags[i].start, end = tags[i].end;
            if (activation) {
                var after = text.slice(end);
                var lead = after.match(/^\s*/)[0];
                if (after.slice(lead.length, lead.length + activation.length) === activation) {
                    end += lead.length + activation.length;
                }
            }
            if (sep && text.slice(start - sep.length, start) === sep) {
                start -= sep.length;
            } else if (start === 0 && sep && text.slice(end, end + sep.length) === sep) {
                end += sep.length;
            }
            text = text.slice(0, start) + text.slice(end);
        }
        return text;
    }

    function addText(text, added, sep) {
        sep = sep === undefined ? " " : sep;
        if (!text.trim()) return added;
        return text + sep + added;
    }

    function toggle(text, payload, unet, te, sep) {
        // remove the adapter's tag when present, else add it with the given strengths
        if (hasTag(text, payload.name, payload.fold)) {
            return removeTag(text, payload.name, payload.activation, sep, payload.fold);
        }
        var added = tagText(payload.name, unet, te, payload.order, payload.lbw, payload.schedule);
        if (payload.activation) added += " " + payload.activation;
        return addText(text, added, sep);
    }

    function setStrengths(text, name, unet, te, order, fold) {
        // rewrite the strengths of every tag of `name`; its other named arguments (lbw=, hr=, …) stay as written
        var tags = findTags(text);
        for (var i = tags.length - 1; i >= 0; i--) {
            if (!sameName(tags[i].name, name, fold)) continue;
            var kept = splitArgs(tags[i].body)[1].filter(function(a) {
                return a.key !== null && a.key !== "unet" && a.key !== "te";
            }).map(function(a) { return ":" + a.raw; }).join("");
            var tag = tagText(tags[i].name, unet, te, order);
            text = text.slice(0, tags[i].start) + tag.slice(0, -1) + kept + ">" + text.slice(tags[i].end);
        }
        return text;
    }

    function toggleNegative(text, negative, adding, sep) {
        if (!negative) return text;
        var present = text.indexOf(negative) >= 0;
        if (adding && !present) return addText(text, negative, sep);
        if (!adding && present) {
            var i = text.indexOf(negative);
            var start = i, end = i + negative.length;
            if (sep && text.slice(start - sep.length, start) === sep) start -= sep.length;
            return text.slice(0, start) + text.slice(end);
        }
        return text;
    }

    var api = {
        fmt: fmt, tagText: tagText, scan: scan, splitArgs: splitArgs, number: number, strength: strength,
        parseTagBody: parseTagBody, findTags: findTags, hasTag: hasTag, removeTag: removeTag, toggle: toggle,
        setStrengths: setStrengths, toggleNegative: toggleNegative, NAMED: NAMED,
    };

    if (typeof module !== "undefined" && module.exports) {
        module.exports = api;
    }
    if (typeof document === "undefined") return;

    // ---- DOM side -------------------------------------------------------------------------------------------

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function option(key, dflt) {
        return typeof opts === "object" && opts && opts[key] !== undefined ? opts[key] : dflt;
    }

    function payloadOf(card) {
        if (card.__adapters) return card.__adapters;
        try {
            card.__adapters = JSON.parse(card.dataset.sortAdapter);
        } catch (e) {
            card.__adapters = null;
        }
        return card.__adapters;
    }

    function tabOf(el) {
        for (var n = el; n && n !== document; n = n.parentNode) {
            var m = n.id && n.id.match(/^(txt2img|img2img)_/);
            if (m) return m[1];
        }
        return "txt2img";
    }

    function promptArea(tab, negative) {
        return app().querySelector("#" + tab + (negative ? "_neg_prompt" : "_prompt") + " textarea");
    }

    function cardsOf(tab) {
        var scope = app().querySelector("#" + tab + "_extra_tabs") || app();
        return Array.prototype.filter.call(scope.querySelectorAll(".card[data-sort-adapter]"), function(c) {
            return tabOf(c) === tab;
        });
    }

    function cardFor(el, name) {
        if (el && el.classList && el.classList.contains("card") && el.dataset.sortAdapter) return el;
        var tab = tabOf(el);
        return cardsOf(tab).find(function(c) {
            return c.dataset.name === name;
        }) || null;
    }

    function setArea(area, text) {
        area.value = text;
        if (typeof updateInput === "function") {
            updateInput(area);
        } else {
            area.dispatchEvent(new Event("input", {bubbles: true}));
        }
    }

    function strengthsOf(card, payload) {
        var inputs = card.querySelectorAll(".adapters-strengths input");
        if (inputs.length === 2) {
            var u = number(inputs[0].value), t = number(inputs[1].value);
            return [u === null ? payload.unet : u, t === null ? payload.te : t];
        }
        return [payload.unet, payload.te];
    }

    function cardClicked(event, el, name) {
        var card = cardFor(el, name);
        if (!card) return false;
        var payload = payloadOf(card);
        if (!payload || payload.error || payload.untaggable) return false;  // its card says why
        var tab = tabOf(card);
        var area = promptArea(tab, false);
        if (!area) return false;
        var sep = option("extra_networks_add_text_separator", " ");
        var s = strengthsOf(card, payload);
        var adding = !hasTag(area.value, payload.name, payload.fold);
        setArea(area, toggle(area.value, payload, s[0], s[1], sep));
        var neg = promptArea(tab, true);
        if (neg && payload.negative) setArea(neg, toggleNegative(neg.value, payload.negative, adding, sep));
        syncTab(tab);
        if (event && event.stopPropagation) event.stopPropagation();
        return false;
    }

    function strengthChanged(card) {
        var payload = payloadOf(card);
        var tab = tabOf(card);
        var area = promptArea(tab, false);
        if (!payload || !area || !hasTag(area.value, payload.name, payload.fold)) return;
        var s = strengthsOf(card, payload);
        setArea(area, setStrengths(area.value, payload.name, s[0], s[1], payload.order, payload.fold));
    }

    function span(cls, text, title) {
        var el = document.createElement("span");
        el.className = cls;
        el.textContent = text;
        if (title) el.title = title;
        return el;
    }

    function strengthInput(value, label, card) {
        var input = document.createElement("input");
        input.type = "number";
        input.step = "0.05";
        input.value = fmt(value);
        input.title = label;
        input.setAttribute("aria-label", label);
        ["click", "mousedown", "keydown"].forEach(function(type) {
            input.addEventListener(type, function(e) {
                e.stopPropagation();
            });
        });
        input.addEventListener("input", function() {
            strengthChanged(card);
        });
        return input;
    }

    function decorate(card) {
        if (card.classList.contains("adapters-card")) return;
        var payload = payloadOf(card);
        if (!payload) return;
        card.classList.add("adapters-card");
        if (payload.mismatch) card.classList.add("adapters-mismatch");
        var badges = document.createElement("div");
        badges.className = "adapters-badges";
        if (payload.error || payload.untaggable) {
            card.classList.add("adapters-error");
            badges.appendChild(span("adapters-badge adapters-error-badge",
                payload.error ? "cannot be used" : "no tag", payload.error || payload.untaggable));
            card.appendChild(badges);
            return;
        }
        badges.appendChild(span("adapters-badge adapters-type", payload.type, "adapter type"));
        badges.appendChild(span("adapters-badge adapters-family" + (payload.mismatch ? " adapters-family-other" : ""),
            payload.family, payload.mismatch ? "made for another model family than the loaded model" : "base model family"));
        if (payload.rank) {
            var block = /^block/.test(payload.rank_label || "");
            badges.appendChild(span("adapters-badge adapters-rank", (block ? "b" : "r") + payload.rank,
                payload.rank_label || "rank " + payload.rank));
        }
        var box = document.createElement("div");
        box.className = "adapters-strengths";
        box.appendChild(span("adapters-label", "U"));
        box.appendChild(strengthInput(payload.unet, "UNet strength", card));
        box.appendChild(span("adapters-label", "TE"));
        box.appendChild(strengthInput(payload.te, "Text-encoder strength", card));
        box.addEventListener("click", function(e) {
            e.stopPropagation();
        });
        card.appendChild(badges);
        var actions = card.querySelector(".actions") || card;
        actions.insertBefore(box, actions.firstChild);
    }

    function syncTab(tab) {
        var area = promptArea(tab, false);
        var text = area ? area.value : "";
        var byOrder = {};  // two numbers are read in the tag order the card carries (setting "unet,te" / "te,unet")
        cardsOf(tab).forEach(function(card) {
            var payload = payloadOf(card);
            if (!payload) return;
            decorate(card);
            var order = payload.order || "unet,te";
            var tags = byOrder[order] || (byOrder[order] = findTags(text, order, 1));
            var found = null;
            tags.forEach(function(t) {
                if (sameName(t.name, payload.name, payload.fold)) found = t;
            });
            card.classList.toggle("adapters-active", !!found && !found.error);
            card.classList.toggle("adapters-malformed", !!found && !!found.error);
            card.title = found && found.error ? "malformed tag <" + (found.body || "") + ">: " + found.error : "";
            if (found && !found.error) {
                var inputs = card.querySelectorAll(".adapters-strengths input");
                if (inputs.length === 2) {
                    var focused = document.activeElement;
                    if (inputs[0] !== focused && typeof found.unet === "number") inputs[0].value = fmt(found.unet);
                    if (inputs[1] !== focused && typeof found.te === "number") inputs[1].value = fmt(found.te);
                }
            }
        });
        addSortButtons(tab);
    }

    var SORTS = [["type", "Type"], ["family", "Family"], ["rank", "Rank"]];

    function addSortButtons(tab) {
        var card = cardsOf(tab)[0];
        var holder = card && card.closest("[id$='_cards']");
        if (!holder) return;
        var base = holder.id.replace(/_cards$/, "");
        var controls = app().querySelector("#" + base + "_controls");
        var proto = app().querySelector("#" + base + "_extra_sort_name");
        if (!controls || !proto || controls.querySelector(".adapters-sort")) return;
        var sorts = controls.querySelectorAll(".extra-network-control--sort");
        var after = sorts[sorts.length - 1];
        SORTS.forEach(function(s) {
            var btn = proto.cloneNode(true);
            btn.id = base + "_extra_sort_adapters_" + s[0];
            btn.dataset.sortkey = s[0];
            btn.title = "Sort by " + s[1].toLowerCase();
            btn.classList.remove("extra-network-control--enabled");
            btn.classList.add("adapters-sort");
            btn.textContent = s[1];
            after.parentNode.insertBefore(btn, after.nextSibling);
            after = btn;
        });
    }

    var timer = null;

    function syncAll() {
        timer = null;
        ["txt2img", "img2img"].forEach(syncTab);
    }

    function schedule() {
        if (timer === null) timer = setTimeout(syncAll, 50);
    }

    document.addEventListener("input", function(e) {
        var t = e.target;
        if (t && t.tagName === "TEXTAREA" && t.closest && t.closest("[id$='_prompt']")) syncTab(tabOf(t));
    }, true);

    if (typeof onUiUpdate === "function") {
        onUiUpdate(schedule);
    } else if (typeof MutationObserver === "function") {
        document.addEventListener("DOMContentLoaded", function() {
            new MutationObserver(schedule).observe(document.body, {childList: true, subtree: true});
            schedule();
        });
    }

    root.adaptersCardClicked = cardClicked;
    root.sdAdapters = api;
    api.syncAll = syncAll;
})(typeof window !== "undefined" ? window : this);
