use super::*;

fn has_color(image: &RgbImage, color: [u8; 3]) -> bool {
    image.pixels().any(|p| p.0 == color)
}

fn count_in(image: &RgbImage, rect: Rect, color: [u8; 3]) -> usize {
    (rect.top..rect.bottom)
        .flat_map(|y| (rect.left..rect.right).map(move |x| (x, y)))
        .filter(|&(x, y)| image.get_pixel(x as u32, y as u32).0 == color)
        .count()
}

fn arms() -> Vec<RocSeries> {
    vec![
        RocSeries {
            label: "Classical augmentation".into(),
            points: vec![(0.0, 0.0), (0.1, 0.5), (0.4, 0.8), (1.0, 1.0)],
            color_index: 0,
        },
        RocSeries {
            label: "CycleGAN".into(),
            points: vec![(0.0, 0.0), (0.05, 0.3), (0.3, 0.9), (1.0, 1.0)],
            color_index: 1,
        },
        RocSeries {
            label: "".into(),
            points: vec![(0.0, 0.0), (0.2, 0.6), (1.0, 1.0)],
            color_index: 1,
        },
        RocSeries {
            label: "CycleGAN + label smoothing".into(),
            points: vec![(0.0, 0.0), (0.0, 0.6), (0.5, 0.95), (1.0, 1.0)],
            color_index: 2,
        },
    ]
}

#[test]
fn roc_png_decodes_with_every_colour_and_legend_text() {
    let dir = std::env::temp_dir().join(format!("melanoflow-plot-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("roc.png");
    roc_png(&path, &arms()).unwrap();
    let image = image::ImageReader::open(&path)
        .unwrap()
        .decode()
        .unwrap()
        .to_rgb8();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(image.dimensions(), (640, 640));
    for index in [0, 1, 2] {
        assert!(
            has_color(&image, series_color(index)),
            "colour {index} missing"
        );
    }
    let (_, legend) = render_roc(&arms());
    let legend = legend.expect("labelled series have a legend");
    // Three distinct labelled entries; the secondary series adds none.
    assert!(legend.bottom - legend.top < 4 * (GLYPH_ROWS * TEXT_SCALE + 8) + 20);
    assert!(count_in(&image, legend, INK) > 100, "legend text missing");
    for index in [0, 1, 2] {
        assert!(
            count_in(&image, legend, series_color(index)) > 20,
            "swatch {index} missing"
        );
    }
}

#[test]
fn degenerate_inputs_do_not_panic() {
    let single = RocSeries {
        label: "one point".into(),
        points: vec![(0.3, 0.7)],
        color_index: 9,
    };
    let empty = RocSeries {
        label: "".into(),
        points: vec![],
        color_index: 0,
    };
    let (image, _) = render_roc(&[single, empty]);
    assert!(
        has_color(&image, series_color(9)),
        "a single point draws a dot"
    );
    render_roc(&[]);
    let long = RocSeries {
        label: "x".repeat(300),
        points: vec![(0.0, 0.0), (1.0, 1.0)],
        color_index: 3,
    };
    render_roc(&[long]);
    render_loss_curves(&[], "", "Epoch");
    render_loss_curves(
        &[("flat".into(), vec![0.5; 3]), ("one".into(), vec![2.0])],
        "t",
        "Epoch",
    );
    render_loss_curves(
        &[("nan".into(), vec![f32::NAN, 1.0, f32::INFINITY, 0.5, 0.4])],
        "gaps",
        "Epoch",
    );
    render_loss_curves(
        &[
            ("all nan".into(), vec![f32::NAN; 4]),
            ("zero".into(), vec![0.0]),
        ],
        "",
        "Epoch",
    );
    render_loss_curves(
        &[
            ("huge".into(), vec![1e9, 3e9]),
            ("tiny".into(), vec![1e-7, 3e-7]),
        ],
        "",
        "Epoch",
    );
}

#[test]
fn loss_curves_png_decodes_with_every_colour_and_legend_text() {
    let steps = 300;
    let series: Vec<(String, Vec<f32>)> = ["G loss", "D_A loss", "D_B loss"]
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let curve = (0..steps)
                .map(|i| 2.0 / (1.0 + i as f32 / 30.0) + 0.1 * k as f32 + 0.05 * (i as f32).sin())
                .collect();
            (name.to_string(), curve)
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("melanoflow-loss-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("loss.png");
    loss_curves_png(&path, &series, "CycleGAN training losses", "Epoch").unwrap();
    let image = image::ImageReader::open(&path)
        .unwrap()
        .decode()
        .unwrap()
        .to_rgb8();
    std::fs::remove_dir_all(&dir).unwrap();
    // Three legend rows below the 720x480 chart.
    let row = GLYPH_ROWS * TEXT_SCALE + 8;
    let legend_height = 2 * LEGEND_PAD + 3 * row - 8;
    assert_eq!(
        image.dimensions(),
        (720, (480 - 4 + legend_height + 12) as u32)
    );
    for index in 0..3 {
        assert!(has_color(&image, series_color(index)));
    }
    let legend = render_loss_curves(&series, "", "Epoch").1.unwrap();
    assert!(count_in(&image, legend, INK) > 100);
    for index in 0..3 {
        assert!(
            count_in(&image, legend, series_color(index)) > 20,
            "swatch {index}"
        );
    }
}

/// Validation ROC-AUC curves climb into the top-right corner, where the
/// legend used to sit: now every curve pixel stays visible, because the
/// legend lies wholly below the plotting area and its axis labels.
#[test]
fn the_legend_never_covers_training_curves() {
    let series: Vec<(String, Vec<f32>)> = (0..3)
        .map(|k| {
            (
                format!("arm{k} val ROC-AUC"),
                (0..10)
                    .map(|e| 0.5 + 0.045 * e as f32 + 0.01 * k as f32)
                    .collect(),
            )
        })
        .collect();
    let (image, legend) = render_loss_curves(&series, "Validation ROC-AUC per epoch", "Epoch");
    let legend = legend.unwrap();
    // The x-axis title's text ends 12 px above the 480 px mark.
    assert!(legend.top >= 480 - 12, "{legend:?}");
    assert_eq!(legend.bottom + 12, image.height() as i64);
    // The last point of the top curve (epoch 9, 0.915) is drawn in its colour.
    let top_right = Rect {
        left: 600,
        top: 30,
        right: 700,
        bottom: 200,
    };
    assert!(count_in(&image, top_right, series_color(2)) > 20);
    // Without labels there is no legend and no extra height.
    let (image, legend) = render_loss_curves(&[(String::new(), vec![0.1, 0.2])], "", "Epoch");
    assert!(legend.is_none());
    assert_eq!(image.height(), 480);
}

/// One epoch per arm (the default pipeline) is one point per series: a
/// line of one point draws nothing, so each point is a dot of its colour.
#[test]
fn single_epoch_series_are_drawn_as_dots() {
    let series: Vec<(String, Vec<f32>)> = (0..4)
        .map(|k| (format!("arm{k} val ROC-AUC"), vec![0.78 + 0.03 * k as f32]))
        .collect();
    let (image, legend) = render_loss_curves(&series, "Validation ROC-AUC per epoch", "Epoch");
    let plot = Rect {
        left: 0,
        top: 0,
        right: image.width() as i64,
        bottom: legend.unwrap().top,
    };
    for k in 0..4 {
        let n = count_in(&image, plot, series_color(k));
        assert!(n >= 12, "arm{k}: {n} pixels of its colour above the legend");
    }
}

#[test]
fn ticks_are_round_and_cover_the_data() {
    let (ticks, range) = nice_ticks(0.13, 2.71, 6, false);
    assert_eq!(range, (0.0, 3.0));
    assert_eq!(
        ticks.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>(),
        ["0.0", "0.5", "1.0", "1.5", "2.0", "2.5", "3.0"]
    );
    let (ticks, range) = nice_ticks(0.0, 3.0, 8, true);
    assert_eq!(range, (0.0, 3.0));
    assert_eq!(ticks.len(), 4);
    assert_eq!(ticks[1].1, "1");
}

#[test]
#[ignore = "writes /tmp/melanoflow-plot-preview-*.png for a person to look at"]
fn preview() {
    roc_png(Path::new("/tmp/melanoflow-plot-preview-roc.png"), &arms()).unwrap();
    let mut glyphs = Canvas::new(640, 120);
    let all: String = (32u8..=126).map(|b| b as char).collect();
    for (row, chunk) in all.as_bytes().chunks(48).enumerate() {
        glyphs.text(
            8,
            8 + row as i64 * 24,
            std::str::from_utf8(chunk).unwrap(),
            2,
            (0.0, 0.0),
            false,
        );
    }
    glyphs.text(
        8,
        60,
        "gjpqy, Ag_ jumpy quay; 0.812 [0.741, 0.874]",
        2,
        (0.0, 0.0),
        false,
    );
    glyphs.text(
        8,
        90,
        "scale 1: The quick brown fox jumps over the lazy dog 0123456789",
        1,
        (0.0, 0.0),
        false,
    );
    glyphs
        .image
        .save("/tmp/melanoflow-plot-preview-font.png")
        .unwrap();
    let series: Vec<(String, Vec<f32>)> = vec![
        (
            "generator".into(),
            (0..500)
                .map(|i| 3.0 * (-(i as f32) / 120.0).exp() + 0.3 + 0.1 * ((i * 7) as f32).sin())
                .collect(),
        ),
        (
            "discriminator".into(),
            (0..500)
                .map(|i| 0.7 - 0.2 * (i as f32 / 500.0) + 0.05 * ((i * 13) as f32).cos())
                .collect(),
        ),
    ];
    loss_curves_png(
        Path::new("/tmp/melanoflow-plot-preview-loss.png"),
        &series,
        "CycleGAN losses",
        "Epoch",
    )
    .unwrap();
}
