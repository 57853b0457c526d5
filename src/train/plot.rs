//! The loss curve as a PNG: training loss per step, held-out loss with and without image
//! features. Rendered with plotters into a buffer and encoded with `image`; the font is embedded
//! (DejaVu Sans, `assets/fonts/`), so no system fonts are needed.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{bad_file, Result};
use crate::train::{StepLog, ValLog};

/// A named, coloured line.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

pub fn loss_curve(path: &Path, train: &[StepLog], val: &[ValLog], title: &str) -> Result<()> {
    register_font();
    let (w, h) = (900u32, 540u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    let err = |e: String| bad_file(path, format!("plot: {e}"));
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let max_step = train.last().map_or(1, |l| l.step).max(1) as f64;
        let values = train
            .iter()
            .map(|l| l.loss)
            .chain(val.iter().flat_map(|v| [v.loss, v.loss_no_image]));
        let (lo, hi) = values
            .filter(|v| v.is_finite())
            .fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(v), b.max(v)));
        let (lo, hi) = if lo > hi {
            (0.0, 1.0)
        } else {
            (lo as f64 * 0.95, hi as f64 * 1.05 + 1e-6)
        };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..max_step, lo..hi)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("loss")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        let series: [Series; 3] = [
            (
                "train",
                BLUE,
                train
                    .iter()
                    .map(|l| (l.step as f64, l.loss as f64))
                    .collect(),
            ),
            (
                "held-out",
                RED,
                val.iter().map(|v| (v.step as f64, v.loss as f64)).collect(),
            ),
            (
                "held-out, images zeroed",
                RGBColor(230, 140, 0),
                val.iter()
                    .map(|v| (v.step as f64, v.loss_no_image as f64))
                    .collect(),
            ),
        ];
        for (name, colour, points) in series {
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).expect("buffer is w*h*3");
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| err(e.to_string()))?;
    crate::util::write_bytes_atomic(path, png.get_ref())
}
