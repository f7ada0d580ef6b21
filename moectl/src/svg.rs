//! `moectl eval --svg`: rank load per layer as a heatmap, before and after a plan side by side.
//!
//! Each cell is one rank of one layer, coloured by its load divided by the layer's mean rank
//! load (the load summed over the history's windows): white is the mean, red above, blue
//! below. Each row ends with the layer's PAR of that summed load, so the numbers match the
//! colours.

use std::fmt::Write;

use eplb::metrics::{par, rank_loads};
use eplb::{LoadHistory, Placement};

/// One panel: a title and a placement.
pub struct Panel<'a> {
    pub title: String,
    pub placement: &'a Placement,
}

struct Grid {
    ratios: Vec<Vec<f64>>,
    pars: Vec<f64>,
}

fn grid(p: &Placement, total: &[Vec<f64>]) -> Grid {
    let mut ratios = Vec::with_capacity(p.num_layers);
    let mut pars = Vec::with_capacity(p.num_layers);
    // Zipped, not indexed: a placement with more layers than the load (refused by `eval`)
    // draws the layers the load has instead of panicking.
    for (row, layer_load) in p.phy2log.iter().zip(total) {
        let loads = rank_loads(row, layer_load, p.num_ranks);
        let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
        ratios.push(
            loads
                .iter()
                .map(|x| if mean > 0.0 { x / mean } else { 1.0 })
                .collect(),
        );
        pars.push(par(&loads));
    }
    Grid { ratios, pars }
}

/// Position of a ratio on the colour scale, in [-1, 1]: logarithmic, so that 1/2 and 2 are
/// equally far from balanced, saturating at `1/top` and `top`, with a power below 1 that makes
/// the small imbalances a good plan leaves visible next to a bad one's large ones.
fn scale_pos(r: f64, top: f64) -> f64 {
    let t = if r > 0.0 {
        (r.ln() / top.ln()).clamp(-1.0, 1.0)
    } else {
        -1.0
    };
    t.signum() * t.abs().powf(0.6)
}

/// Blue (-1) - white (0) - red (1).
fn colour_at(t: f64) -> String {
    let (c0, c1, t) = if t <= 0.0 {
        ((255.0, 255.0, 255.0), (49.0, 104.0, 176.0), -t)
    } else {
        ((255.0, 255.0, 255.0), (190.0, 30.0, 45.0), t)
    };
    let mix = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        mix(c0.0, c1.0),
        mix(c0.1, c1.1),
        mix(c0.2, c1.2)
    )
}

fn colour(r: f64, top: f64) -> String {
    colour_at(scale_pos(r, top))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders the heatmap. `source` names the load in the caption.
pub fn render(panels: &[Panel], history: &LoadHistory, source: &str) -> String {
    let total = history.total();
    let grids: Vec<Grid> = panels.iter().map(|p| grid(p.placement, &total)).collect();
    let max_ratio = grids
        .iter()
        .flat_map(|g| g.ratios.iter().flatten())
        .copied()
        .fold(1.0, f64::max);
    // Top of the scale: the largest ratio, at least 1.25 (a nearly balanced plan still shows
    // shades) and at most 2 (beyond, the colour saturates).
    let top = max_ratio.clamp(1.25, 2.0);
    let layers = panels
        .iter()
        .map(|p| p.placement.num_layers)
        .max()
        .unwrap_or(1);
    let ch = (720.0 / layers as f64).clamp(6.0, 18.0).floor();
    let label_every = if ch >= 11.0 {
        1
    } else {
        (11.0 / ch).ceil() as usize
    };
    let (left, top_margin, par_w, gap) = (44.0, 92.0, 52.0, 36.0);
    let widths: Vec<f64> = panels
        .iter()
        .map(|p| {
            let cw = (420.0 / p.placement.num_ranks as f64)
                .clamp(5.0, 28.0)
                .floor();
            cw * p.placement.num_ranks as f64
        })
        .collect();
    let headers: Vec<String> = panels
        .iter()
        .zip(&grids)
        .map(|(panel, g)| {
            let mean_par = g.pars.iter().sum::<f64>() / g.pars.len().max(1) as f64;
            let worst = g.pars.iter().copied().fold(1.0, f64::max);
            format!(
                "mean PAR {mean_par:.3}, worst {worst:.3}; {} x {}",
                crate::inputs::count(panel.placement.num_ranks, "rank"),
                crate::inputs::count(panel.placement.slots_per_rank(), "slot")
            )
        })
        .collect();
    // A panel is as wide as its grid and PAR column, or as its title and header lines when
    // those are wider (few ranks): estimated at 8 px a character of the 13 px bold title and
    // 6.5 px of the 11 px header.
    let spans: Vec<f64> = panels
        .iter()
        .zip(&widths)
        .zip(&headers)
        .map(|((panel, w), header)| {
            let title = panel.title.chars().count() as f64 * 8.0;
            let header = header.chars().count() as f64 * 6.5;
            left + (w + par_w).max(title).max(header)
        })
        .collect();
    let body_w: f64 = spans.iter().sum::<f64>() + gap * (panels.len().saturating_sub(1)) as f64;
    let width = (body_w + 64.0).max(640.0);
    let grid_h = ch * layers as f64;
    let legend_y = top_margin + grid_h + 34.0;
    let height = legend_y + 78.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif" font-size="11">"##
    );
    let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="12" y="22" font-size="15" font-weight="bold">Rank load per MoE layer (load / mean rank load of the layer)</text>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="12" y="40" fill="#444">{} window{} of {} summed; PAR = heaviest rank / mean rank</text>"##,
        history.num_windows(),
        if history.num_windows() == 1 { "" } else { "s" },
        esc(source)
    );
    let mut x0 = 12.0;
    for (((panel, g), w), (header, span)) in panels
        .iter()
        .zip(&grids)
        .zip(&widths)
        .zip(headers.iter().zip(&spans))
    {
        let p = panel.placement;
        let cw = w / p.num_ranks as f64;
        let gx = x0 + left;
        let _ = writeln!(
            s,
            r##"<text x="{gx}" y="60" font-size="13" font-weight="bold">{}</text>"##,
            esc(&panel.title)
        );
        let _ = writeln!(
            s,
            r##"<text x="{gx}" y="75" fill="#444">{}</text>"##,
            esc(header)
        );
        // Rank numbers along the top.
        let rank_every = ((24.0 / cw).ceil() as usize).max(1);
        for r in (0..p.num_ranks).step_by(rank_every) {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9" fill="#555">{r}</text>"##,
                gx + (r as f64 + 0.5) * cw,
                top_margin - 4.0
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="9" fill="#555" text-anchor="end">rank</text>"##,
            gx - 4.0,
            top_margin - 4.0
        );
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="9" fill="#555">PAR</text>"##,
            gx + w + 6.0,
            top_margin - 4.0
        );
        for (l, row) in g.ratios.iter().enumerate() {
            let y = top_margin + l as f64 * ch;
            if l % label_every == 0 {
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" text-anchor="end" font-size="9" fill="#555">L{l}</text>"##,
                    gx - 4.0,
                    y + ch * 0.5 + 3.0
                );
            }
            for (r, &ratio) in row.iter().enumerate() {
                let _ = writeln!(
                    s,
                    r##"<rect x="{:.1}" y="{y:.1}" width="{cw:.1}" height="{ch:.1}" fill="{}"><title>layer {l} rank {r}: {ratio:.3} x mean</title></rect>"##,
                    gx + r as f64 * cw,
                    colour(ratio, top)
                );
            }
            let parv = g.pars[l];
            if l % label_every == 0 || parv >= 1.2 {
                let weight = if parv >= 1.2 { "bold" } else { "normal" };
                let _ = writeln!(
                    s,
                    r##"<text x="{:.1}" y="{:.1}" font-size="9" font-weight="{weight}" fill="{}">{parv:.2}</text>"##,
                    gx + w + 6.0,
                    y + ch * 0.5 + 3.0,
                    if parv >= 1.2 { "#b01e2d" } else { "#333" }
                );
            }
        }
        let _ = writeln!(
            s,
            r##"<rect x="{gx}" y="{top_margin}" width="{w:.1}" height="{:.1}" fill="none" stroke="#888" stroke-width="0.6"/>"##,
            ch * p.num_layers as f64
        );
        x0 += span + gap;
    }
    // Legend: the colour scale with ticks at round ratios.
    let bar_x = 12.0 + left;
    let bar_w = 420.0;
    let _ = writeln!(
        s,
        r##"<defs><linearGradient id="scale" x1="0" x2="1" y1="0" y2="0"><stop offset="0" stop-color="{}"/><stop offset="0.5" stop-color="#ffffff"/><stop offset="1" stop-color="{}"/></linearGradient></defs>"##,
        colour_at(-1.0),
        colour_at(1.0)
    );
    let _ = writeln!(
        s,
        r##"<text x="{bar_x}" y="{:.1}" font-size="11">rank load / mean rank load of its layer (white: balanced; PAR of 1.2 or more in bold red)</text>"##,
        legend_y - 6.0
    );
    let _ = writeln!(
        s,
        r##"<rect x="{bar_x}" y="{legend_y}" width="{bar_w}" height="12" fill="url(#scale)" stroke="#888" stroke-width="0.6"/>"##
    );
    let ticks = [0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0];
    for &t in ticks
        .iter()
        .filter(|&&t| t <= top + 1e-9 && t >= 1.0 / top - 1e-9)
    {
        let x = bar_x + bar_w * (0.5 + 0.5 * scale_pos(t, top));
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}" stroke="#333" stroke-width="0.8"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="10">{t}</text>"##,
            legend_y + 12.0,
            legend_y + 16.0,
            legend_y + 28.0
        );
    }
    if max_ratio > top {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="10">{top:.2} or more (largest {max_ratio:.2})</text>"##,
            bar_x + bar_w + 8.0,
            legend_y + 10.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_and_panels() {
        assert_eq!(colour(1.0, 2.0), "#ffffff");
        assert_eq!(colour(0.0, 2.0), "#3168b0");
        assert_eq!(colour(0.5, 2.0), "#3168b0");
        assert_eq!(colour(3.0, 2.0), "#be1e2d");
        assert!((scale_pos(2.0, 2.0) + scale_pos(0.5, 2.0)).abs() < 1e-12);
        let p = Placement::from_phy2log(3, 2, 1, vec![vec![0, 1, 2, 0]]).unwrap();
        let h = LoadHistory::single(vec![vec![10.0, 4.0, 6.0]]).unwrap();
        let svg = render(
            &[Panel {
                title: "after".into(),
                placement: &p,
            }],
            &h,
            "load.json",
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("layer 0 rank 1: 1.100 x mean"), "{svg}");
        assert!(svg.contains("mean PAR 1.100"));
    }

    /// A panel with more layers than the load (eval refuses it; the drawing must not panic
    /// either) draws the layers the load has.
    #[test]
    fn a_placement_longer_than_the_load_does_not_panic() {
        let p = Placement::from_phy2log(3, 2, 1, vec![vec![0, 1, 2, 0], vec![0, 1, 2, 1]]).unwrap();
        let h = LoadHistory::single(vec![vec![10.0, 4.0, 6.0]]).unwrap();
        let svg = render(
            &[Panel {
                title: "after".into(),
                placement: &p,
            }],
            &h,
            "load.json",
        );
        assert!(svg.contains("layer 0 rank 1"), "{svg}");
        assert!(!svg.contains("layer 1 rank"), "{svg}");
    }

    /// Panels of few ranks are as wide as their header lines, so the next panel's title and
    /// header start after them instead of overprinting them.
    #[test]
    fn narrow_panels_do_not_overlap_their_headers() {
        let p = Placement::from_phy2log(3, 2, 1, vec![vec![0, 1, 2, 0]]).unwrap();
        let h = LoadHistory::single(vec![vec![10.0, 4.0, 6.0]]).unwrap();
        let panels = [
            Panel {
                title: "before: a-rather-long-placement-file-name.json".into(),
                placement: &p,
            },
            Panel {
                title: "after: p.json".into(),
                placement: &p,
            },
        ];
        let svg = render(&panels, &h, "load.json");
        // (x, text) of the title (y=60) and header (y=75) lines of each panel.
        let lines = |y: &str| -> Vec<(f64, String)> {
            svg.lines()
                .filter(|l| l.contains(&format!("y=\"{y}\"")))
                .map(|l| {
                    let x = l.split("x=\"").nth(1).unwrap().split('"').next().unwrap();
                    let text = l.split('>').nth(1).unwrap().split('<').next().unwrap();
                    (x.parse().unwrap(), text.to_string())
                })
                .collect()
        };
        for (y, px_per_char) in [("60", 7.5), ("75", 5.5)] {
            let l = lines(y);
            assert_eq!(l.len(), 2, "{svg}");
            let end_of_first = l[0].0 + l[0].1.chars().count() as f64 * px_per_char;
            assert!(end_of_first < l[1].0, "{l:?}");
        }
        let width: f64 = svg
            .split("width=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let l = lines("75");
        assert!(
            l[1].0 + l[1].1.chars().count() as f64 * 5.5 < width,
            "{l:?} {width}"
        );
    }
}
