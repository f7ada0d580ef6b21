#!/usr/bin/env python3
"""Generates helm/moe-operator/dashboards/moe-operator.json (the Grafana dashboard).

Edit this file, then run `python3 helm/tools/gen-dashboard.py`; helm/test.sh fails when the
committed JSON differs from what this prints. Standard library only.
"""
import json
import os
import sys

DS = {"type": "prometheus", "uid": "${datasource}"}
OP = 'namespace=~"$namespace", name=~"$deployment"'  # operator series: {namespace, name}
WK = 'namespace=~"$namespace", moe_deployment=~"$deployment"'  # worker series (PodMonitor)
RI = "$__rate_interval"

_next_id = [0]


def pid():
    _next_id[0] += 1
    return _next_id[0]


def target(expr, legend, ref, **extra):
    t = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}
    t.update(extra)
    return t


def targets(*pairs):
    return [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(pairs)]


def timeseries(title, desc, x, y, w, h, tgts, unit="short", draw="line", thresholds=None,
               stack=False, min_=None):
    p = {
        "id": pid(), "type": "timeseries", "title": title, "description": desc,
        "datasource": DS, "gridPos": {"x": x, "y": y, "w": w, "h": h}, "targets": tgts,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {
                    "drawStyle": draw, "lineWidth": 1, "fillOpacity": 10 if draw == "line" else 80,
                    "showPoints": "never", "spanNulls": False,
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                    "thresholdsStyle": {"mode": "line" if thresholds else "off"},
                },
                "thresholds": {"mode": "absolute", "steps": thresholds or [{"color": "green", "value": None}]},
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }
    if min_ is not None:
        p["fieldConfig"]["defaults"]["min"] = min_
    return p


def stat(title, desc, x, y, w, h, tgts, unit="short", thresholds=None, decimals=None):
    p = {
        "id": pid(), "type": "stat", "title": title, "description": desc, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h}, "targets": tgts,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {"mode": "absolute", "steps": thresholds or [{"color": "green", "value": None}]},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value", "graphMode": "area", "textMode": "auto", "justifyMode": "auto",
            "orientation": "auto",
        },
    }
    if decimals is not None:
        p["fieldConfig"]["defaults"]["decimals"] = decimals
    return p


def row(title, y):
    return {"id": pid(), "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


PAR_STEPS = [{"color": "green", "value": None}, {"color": "yellow", "value": 1.2},
             {"color": "red", "value": 1.5}]


def quantiles(metric, by, sel, qs=(0.5, 0.9, 0.99)):
    return [(f'histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{sel}}}[{RI}])))',
             f"p{int(q * 100)} {{{{namespace}}}}/{{{{{by.split(', ')[-1]}}}}}") for q in qs]


def build():
    panels = []
    y = 0
    panels += [
        stat("Worst-layer PAR", "Worst per-layer peak-to-average rank load (1.0 is perfect balance), highest over the selected deployments.",
             0, y, 6, 4, targets((f"max(moe_deployment_worst_imbalance_ratio{{{OP}}})", "worst PAR")),
             thresholds=PAR_STEPS, decimals=2),
        stat("Ready ranks", "Ready expert-parallel ranks (operator's view), summed over the selected deployments.",
             6, y, 6, 4, targets((f"sum(moe_deployment_ready_ranks{{{OP}}})", "ready ranks"))),
        stat("Tokens/s", "Tokens per second processed by all selected ranks.",
             12, y, 6, 4, targets((f"sum(rate(moe_worker_tokens_total{{{WK}}}[{RI}]))", "tokens/s")),
             unit="short"),
        stat("Remaps (range)", "Remaps in the dashboard's time range.",
             18, y, 6, 4, targets((f"sum(increase(moe_deployment_remaps_total{{{OP}}}[$__range]))", "remaps")),
             decimals=0),
    ]
    y += 4
    panels.append(row("Expert balance", y)); y += 1
    panels.append(timeseries(
        "Worst-layer PAR per deployment",
        "Peak-to-average rank load of each deployment's worst MoE layer over time. A remap should bring it back under the deployment's spec.eplb.imbalanceThreshold.",
        0, y, 12, 9,
        targets((f"max by (namespace, name) (moe_deployment_worst_imbalance_ratio{{{OP}}})", "{{namespace}}/{{name}}")),
        unit="none", thresholds=PAR_STEPS, min_=1))
    panels.append({
        "id": pid(), "type": "heatmap", "title": "PAR per layer",
        "description": "Peak-to-average rank load of every MoE layer over time (select one deployment; with several, the maximum over them).",
        "datasource": DS, "gridPos": {"x": 12, "y": y, "w": 12, "h": 9},
        "targets": [target(f"max by (layer) (moe_deployment_imbalance_ratio{{{OP}}})", "{{layer}}", "A",
                           format="heatmap", interval="")],
        "fieldConfig": {"defaults": {"custom": {"scaleDistribution": {"type": "linear"}}}, "overrides": []},
        "options": {
            "calculate": False,
            "yAxis": {"axisPlacement": "left", "axisLabel": "layer", "reverse": False},
            "rowsFrame": {"layout": "auto"},
            "color": {"mode": "scheme", "scheme": "Oranges", "fill": "dark-orange", "scale": "exponential",
                      "exponent": 0.5, "steps": 64, "reverse": False, "min": 1},
            "cellGap": 1, "showValue": "never",
            "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": True},
            "legend": {"show": True},
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
        },
    })
    y += 9
    panels.append(row("Throughput", y)); y += 1
    panels.append(timeseries(
        "Tokens/s per deployment", "Tokens per second over all ranks of each deployment (worker counters).",
        0, y, 8, 8,
        targets((f"sum by (namespace, moe_deployment) (rate(moe_worker_tokens_total{{{WK}}}[{RI}]))",
                 "{{namespace}}/{{moe_deployment}}"))))
    panels.append(timeseries(
        "Step time percentiles", "Wall time of one step (all MoE layers, including communication), per deployment. A hot rank stretches every rank's step.",
        8, y, 8, 8, targets(*quantiles("moe_worker_step_duration_seconds", "namespace, moe_deployment", WK)), unit="s"))
    panels.append(timeseries(
        "Tokens/s per rank", "Recent tokens per second of each rank; ranks of one group should be close.",
        16, y, 8, 8,
        targets((f"max by (namespace, moe_deployment, rank) (moe_worker_tokens_per_second{{{WK}}})",
                 "{{moe_deployment}} rank {{rank}}"))))
    y += 8
    panels.append(row("Remaps", y)); y += 1
    panels.append(timeseries(
        "Remaps", "Remaps per deployment by trigger (Threshold, Manual) and result.",
        0, y, 8, 8,
        targets((f"sum by (namespace, name, trigger, result) (increase(moe_deployment_remaps_total{{{OP}}}[{RI}]))",
                 "{{name}} {{trigger}} {{result}}"),
                (f'sum by (namespace, moe_deployment, result) (increase(moe_worker_remaps_total{{{WK}}}[{RI}]))',
                 "{{moe_deployment}} rank-side {{result}}")),
        draw="bars", stack=True))
    panels.append(timeseries(
        "Bytes moved by remaps", "Expert weight bytes moved: the operator's total per deployment, and the bytes the ranks received.",
        8, y, 8, 8,
        targets((f"sum by (namespace, name) (increase(moe_deployment_remap_bytes_moved_total{{{OP}}}[{RI}]))",
                 "{{name}} (operator)"),
                (f"sum by (namespace, moe_deployment) (increase(moe_worker_remap_bytes_total{{{WK}}}[{RI}]))",
                 "{{moe_deployment}} (received by ranks)"),
                (f"sum by (namespace, moe_deployment) (increase(moe_worker_remap_experts_moved_total{{{WK}}}[{RI}]))",
                 "{{moe_deployment}} experts moved")),
        unit="bytes", draw="bars"))
    panels.append(timeseries(
        "Remap duration and stall", "Remap wall time (p50/p99 over ranks) and the fraction of time forward passes were held back by remaps.",
        16, y, 8, 8,
        targets(*quantiles("moe_worker_remap_duration_seconds", "namespace, moe_deployment", WK, (0.5, 0.99)),
                (f"sum by (namespace, moe_deployment) (rate(moe_worker_remap_stall_seconds_total{{{WK}}}[{RI}]))"
                 f" / count by (namespace, moe_deployment) (moe_worker_remap_stall_seconds_total{{{WK}}})",
                 "stall fraction {{moe_deployment}}")),
        unit="s"))
    y += 8
    panels.append(timeseries(
        "Placement generation", "Committed (desired) and served (applied) placement generation; a gap that lasts means a remap is stuck.",
        0, y, 12, 7,
        targets((f"max by (namespace, name, kind) (moe_deployment_placement_generation{{{OP}}})",
                 "{{name}} {{kind}}"),
                (f"min by (namespace, moe_deployment) (moe_worker_placement_generation{{{WK}}})",
                 "{{moe_deployment}} served by every rank")),
        unit="none"))
    panels.append(timeseries(
        "Remap progress", "Layers switched by the current or last remap over layers to switch (min over ranks).",
        12, y, 12, 7,
        targets((f"min by (namespace, moe_deployment) (moe_worker_remap_layers_done{{{WK}}})"
                 f" / max by (namespace, moe_deployment) (moe_worker_remap_layers_total{{{WK}}})",
                 "{{moe_deployment}}")),
        unit="percentunit", min_=0))
    y += 7
    panels.append(row("Ranks", y)); y += 1
    panels.append(timeseries(
        "Ready ranks", "Ready ranks as the operator sees them, ranks reporting ready themselves, and ranks scraped.",
        0, y, 12, 8,
        targets((f"max by (namespace, name) (moe_deployment_ready_ranks{{{OP}}})", "{{name}} ready (operator)"),
                (f"sum by (namespace, moe_deployment) (moe_worker_ready{{{WK}}})", "{{moe_deployment}} ready (ranks)"),
                (f"count by (namespace, moe_deployment) (moe_worker_ready{{{WK}}})", "{{moe_deployment}} scraped")),
        unit="none", min_=0))
    panels.append(timeseries(
        "Group restarts and rank imbalance", "Whole-group restarts made by the operator, and each rank's own view of its worst layer's imbalance.",
        12, y, 12, 8,
        targets((f"sum by (namespace, name, reason) (increase(moe_deployment_group_restarts_total{{{OP}}}[{RI}]))",
                 "{{name}} restart: {{reason}}"),
                (f"max by (namespace, moe_deployment, rank) (moe_worker_layer_imbalance_ratio{{{WK}}})",
                 "{{moe_deployment}} rank {{rank}} worst layer PAR")),
        unit="none"))
    y += 8
    panels.append(row("Operator", y)); y += 1
    panels.append(timeseries(
        "Reconciliations", "Reconciliations per second by result, and errors.",
        0, y, 8, 7,
        targets(("sum by (result) (rate(controller_runtime_reconcile_total[$__rate_interval]))", "{{result}}"),
                ("sum (rate(controller_runtime_reconcile_errors_total[$__rate_interval]))", "errors")),
        unit="ops"))
    panels.append(timeseries(
        "Reconcile time", "Time per reconciliation.", 8, y, 8, 7,
        targets(*[(f"histogram_quantile({q}, sum by (le) (rate(controller_runtime_reconcile_time_seconds_bucket[$__rate_interval])))",
                   f"p{int(q * 100)}") for q in (0.5, 0.99)]),
        unit="s"))
    panels.append(timeseries(
        "Leader", "1 for the replica holding the leader Lease.", 16, y, 8, 7,
        targets(("max by (pod, name) (leader_election_master_status)", "{{pod}} ({{name}})")),
        unit="none", min_=0))

    def var_query(name, label, query, multi=True):
        return {
            "name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": multi, "allValue": ".*", "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        }

    return {
        "uid": "moe-operator-overview",
        "title": "MoE operator: expert-parallel deployments",
        "description": "MoEDeployments: expert load balance (PAR), throughput, remaps, ranks, and the operator itself. Worker series need the chart's PodMonitor (label moe_deployment).",
        "tags": ["moe", "moe-operator", "eplb"],
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "time": {"from": "now-3h", "to": "now"}, "refresh": "30s", "timezone": "",
        "annotations": {"list": []}, "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": ""},
            var_query("namespace", "Namespace", "label_values(moe_deployment_worst_imbalance_ratio, namespace)"),
            var_query("deployment", "MoEDeployment",
                      'label_values(moe_deployment_worst_imbalance_ratio{namespace=~"$namespace"}, name)'),
        ]},
        "panels": panels,
    }


def main():
    out = json.dumps(build(), indent=2, sort_keys=True) + "\n"
    if len(sys.argv) > 1 and sys.argv[1] == "--stdout":
        sys.stdout.write(out)
        return
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "moe-operator", "dashboards", "moe-operator.json")
    with open(path, "w") as f:
        f.write(out)


if __name__ == "__main__":
    main()
