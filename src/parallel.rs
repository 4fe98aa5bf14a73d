//! Row bands for the per-frame CPU work (scaling, Canny, the thumbnail, buffer copies), run on
//! rayon's global pool (`RAYON_NUM_THREADS` sets its size; candle's CPU kernels share it).
//! Every banded function gives exactly the result of one band, whatever the band count: each
//! band computes its own rows from the whole input, and results that combine bands (sums,
//! hysteresis) do not depend on the order of the bands.

/// How many threads banded work uses.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Bands for `rows` rows so that no band is under `min_rows` (spawning costs more than tiny
/// bands save): at most one per thread, at least one.
pub fn band_count(rows: usize, min_rows: usize) -> usize {
    (rows / min_rows.max(1)).clamp(1, threads())
}

/// Splits `0..rows` into `bands` contiguous ranges of nearly equal size (the first ones one
/// row longer), in order.
pub fn split_rows(rows: usize, bands: usize) -> Vec<std::ops::Range<usize>> {
    let bands = bands.clamp(1, rows.max(1));
    let (base, extra) = (rows / bands, rows % bands);
    let mut start = 0;
    (0..bands)
        .map(|band| {
            let len = base + usize::from(band < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_cover_every_row_once_in_order() {
        for rows in [0, 1, 7, 64, 513] {
            for bands in 1..9 {
                let ranges = split_rows(rows, bands);
                assert!(!ranges.is_empty());
                assert_eq!(ranges.first().unwrap().start, 0);
                assert_eq!(ranges.last().unwrap().end, rows);
                for pair in ranges.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                }
                let lengths: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
                assert!(lengths.iter().max().unwrap() - lengths.iter().min().unwrap() <= 1, "{lengths:?}");
            }
        }
    }
}
