//! Rasterise one coloured shape on a coloured, slightly noisy background.

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Cross,
}

pub const SHAPES: [Shape; 5] = [
    Shape::Circle,
    Shape::Square,
    Shape::Triangle,
    Shape::Star,
    Shape::Cross,
];

impl Shape {
    pub fn en(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Cross => "cross",
        }
    }
    pub fn zh(self) -> &'static str {
        match self {
            Shape::Circle => "圆形",
            Shape::Square => "正方形",
            Shape::Triangle => "三角形",
            Shape::Star => "星形",
            Shape::Cross => "十字形",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Colour {
    pub en: &'static str,
    pub zh: &'static str,
    pub rgb: [u8; 3],
}

pub const COLOURS: [Colour; 8] = [
    Colour {
        en: "red",
        zh: "红色",
        rgb: [220, 30, 30],
    },
    Colour {
        en: "green",
        zh: "绿色",
        rgb: [30, 170, 50],
    },
    Colour {
        en: "blue",
        zh: "蓝色",
        rgb: [30, 60, 220],
    },
    Colour {
        en: "yellow",
        zh: "黄色",
        rgb: [240, 220, 30],
    },
    Colour {
        en: "purple",
        zh: "紫色",
        rgb: [140, 40, 180],
    },
    Colour {
        en: "orange",
        zh: "橙色",
        rgb: [250, 140, 20],
    },
    Colour {
        en: "white",
        zh: "白色",
        rgb: [245, 245, 245],
    },
    Colour {
        en: "black",
        zh: "黑色",
        rgb: [15, 15, 15],
    },
];

/// Backgrounds: muted tones, named, never equal to the shape colour.
pub const BACKGROUNDS: [Colour; 6] = [
    Colour {
        en: "grey",
        zh: "灰色",
        rgb: [128, 128, 128],
    },
    Colour {
        en: "beige",
        zh: "米色",
        rgb: [225, 210, 170],
    },
    Colour {
        en: "light blue",
        zh: "浅蓝色",
        rgb: [160, 200, 235],
    },
    Colour {
        en: "dark green",
        zh: "深绿色",
        rgb: [30, 80, 50],
    },
    Colour {
        en: "brown",
        zh: "棕色",
        rgb: [110, 70, 40],
    },
    Colour {
        en: "pink",
        zh: "粉色",
        rgb: [240, 170, 190],
    },
];

/// What one picture shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scene {
    pub shape: Shape,
    pub colour: usize,
    pub background: usize,
    /// Centre and radius in pixels.
    pub cx: f32,
    pub cy: f32,
    pub r: f32,
}

impl Scene {
    pub fn random(rng: &mut impl Rng, size: u32) -> Self {
        let s = size as f32;
        // Big enough to span ~5 of the 7×7 patches a 224/32 tower sees: at 0.18–0.34 even a
        // probe on raw pixels could not tell the shapes apart (docs/DEMO.md).
        let r = rng.random_range(0.32..0.45) * s;
        Self {
            shape: SHAPES[rng.random_range(0..SHAPES.len())],
            colour: rng.random_range(0..COLOURS.len()),
            background: rng.random_range(0..BACKGROUNDS.len()),
            cx: rng.random_range(r..s - r),
            cy: rng.random_range(r..s - r),
            r,
        }
    }
}

fn inside_polygon(x: f32, y: f32, pts: &[(f32, f32)]) -> bool {
    let mut inside = false;
    let mut j = pts.len() - 1;
    for i in 0..pts.len() {
        let (xi, yi) = pts[i];
        let (xj, yj) = pts[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

fn regular(cx: f32, cy: f32, radii: &[f32], n: usize) -> Vec<(f32, f32)> {
    (0..n)
        .map(|k| {
            let a = -std::f32::consts::FRAC_PI_2 + k as f32 * std::f32::consts::TAU / n as f32;
            let r = radii[k % radii.len()];
            (cx + r * a.cos(), cy + r * a.sin())
        })
        .collect()
}

/// Whether a point is inside the scene's shape; polygons are built once per image, not per
/// sample point.
struct Coverage<'a> {
    scene: &'a Scene,
    polygon: Vec<(f32, f32)>,
}

impl<'a> Coverage<'a> {
    fn new(scene: &'a Scene) -> Self {
        let (cx, cy, r) = (scene.cx, scene.cy, scene.r);
        let polygon = match scene.shape {
            Shape::Triangle => regular(cx, cy + 0.2 * r, &[r * 1.1], 3),
            Shape::Star => regular(cx, cy, &[r, 0.45 * r], 10),
            _ => Vec::new(),
        };
        Self { scene, polygon }
    }

    fn covers(&self, x: f32, y: f32) -> bool {
        let scene = self.scene;
        let (dx, dy, r) = (x - scene.cx, y - scene.cy, scene.r);
        match scene.shape {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= 0.8 * r && dy.abs() <= 0.8 * r,
            Shape::Triangle | Shape::Star => inside_polygon(x, y, &self.polygon),
            Shape::Cross => {
                (dx.abs() <= 0.3 * r && dy.abs() <= r) || (dy.abs() <= 0.3 * r && dx.abs() <= r)
            }
        }
    }
}

/// Render `scene` at `size`×`size` with 2×2 supersampling and mild background noise.
pub fn render(scene: &Scene, size: u32, rng: &mut impl Rng) -> image::RgbImage {
    render_with(scene, size, &noise(size, rng))
}

/// The background noise `render` draws from `rng`: one value per pixel, row by row.
pub fn noise(size: u32, rng: &mut impl Rng) -> Vec<i8> {
    (0..size * size)
        .map(|_| rng.random_range(-8..=8i32) as i8)
        .collect()
}

/// `render` with its noise (from [`noise`]) already drawn: needs no generator, so images can be
/// rendered in parallel and still be the same as drawn one by one.
pub fn render_with(scene: &Scene, size: u32, noise: &[i8]) -> image::RgbImage {
    assert_eq!(
        noise.len(),
        (size * size) as usize,
        "one noise value per pixel"
    );
    let fg = COLOURS[scene.colour].rgb;
    let bg = BACKGROUNDS[scene.background].rgb;
    let coverage = Coverage::new(scene);
    image::RgbImage::from_fn(size, size, |x, y| {
        let mut hits = 0;
        for (ox, oy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
            hits += coverage.covers(x as f32 + ox, y as f32 + oy) as u32;
        }
        let noise = noise[(y * size + x) as usize] as i32;
        let px = |c: usize| {
            let back = (bg[c] as i32 + noise).clamp(0, 255) as u32;
            ((fg[c] as u32 * hits + back * (4 - hits)) / 4) as u8
        };
        image::Rgb([px(0), px(1), px(2)])
    })
}
