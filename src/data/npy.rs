//! NumPy's `.npy` format for the one array shape pretext stores: a
//! little-endian `float32` matrix in C order (embed jobs' embeddings). What
//! is written loads with `numpy.load`; what is read is only that shape, so a
//! file of any other kind is refused rather than misread.

use std::io::Write;

const MAGIC: &[u8] = b"\x93NUMPY";

/// The header of version 1.0 for a `rows × cols` float32 matrix, padded
/// with spaces to a multiple of 64 bytes and ended by a newline, as NumPy
/// writes it.
fn header(rows: usize, cols: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // Magic (6), version (2), header length (2), dict, padding, newline.
    let unpadded = MAGIC.len() + 2 + 2 + dict.len() + 1;
    let padding = (64 - unpadded % 64) % 64;
    let header_len = dict.len() + padding + 1;
    let mut out = Vec::with_capacity(unpadded + padding);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header_len as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.extend(std::iter::repeat_n(b' ', padding));
    out.push(b'\n');
    out
}

/// Writes `values` (row after row, `cols` each) as a float32 `.npy` matrix.
pub fn write_f32_matrix(out: &mut impl Write, values: &[f32], cols: usize) -> std::io::Result<()> {
    let rows = values.len().checked_div(cols).unwrap_or(0);
    assert_eq!(rows * cols, values.len(), "a matrix has whole rows");
    out.write_all(&header(rows, cols))?;
    for value in values {
        out.write_all(&value.to_le_bytes())?;
    }
    Ok(())
}

/// A float32 matrix read from `.npy` bytes: `(rows, cols, values)`.
pub fn read_f32_matrix(bytes: &[u8]) -> anyhow::Result<(usize, usize, Vec<f32>)> {
    anyhow::ensure!(
        bytes.len() >= 10 && bytes.starts_with(MAGIC),
        "not an .npy file"
    );
    let (header_len, dict_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        version => anyhow::bail!("unsupported .npy version {version}"),
    };
    let data_start = dict_start + header_len;
    anyhow::ensure!(bytes.len() >= data_start, "the .npy header is cut short");
    let dict = std::str::from_utf8(&bytes[dict_start..data_start])?;
    anyhow::ensure!(
        dict.contains("'descr': '<f4'"),
        "the array is not little-endian float32"
    );
    anyhow::ensure!(
        dict.contains("'fortran_order': False"),
        "the array is not in C order"
    );
    let shape = dict
        .split("'shape': (")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .ok_or_else(|| anyhow::anyhow!("the .npy header has no shape"))?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let [rows, cols] = dims[..] else {
        anyhow::bail!("the array has shape ({shape}), not a matrix's");
    };
    let data = &bytes[data_start..];
    anyhow::ensure!(
        Some(data.len()) == rows.checked_mul(cols).and_then(|n| n.checked_mul(4)),
        "the .npy data holds {} bytes, not the {rows}×{cols} float32 of its header",
        data.len()
    );
    let values = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((rows, cols, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_matrix_reads_back_as_written_with_an_aligned_header() {
        let values: Vec<f32> = (0..12).map(|v| v as f32 * 0.5 - 1.0).collect();
        let mut bytes = Vec::new();
        write_f32_matrix(&mut bytes, &values, 4).unwrap();
        let header_end = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!(header_end % 64, 0, "NumPy aligns the data to 64 bytes");
        assert_eq!(bytes[header_end - 1], b'\n');
        assert_eq!(read_f32_matrix(&bytes).unwrap(), (3, 4, values));
    }

    #[test]
    fn other_arrays_and_cut_files_are_refused() {
        let mut bytes = Vec::new();
        write_f32_matrix(&mut bytes, &[1.0, 2.0], 2).unwrap();
        assert!(read_f32_matrix(&bytes[..bytes.len() - 1]).is_err());
        let mut as_f8 = bytes.clone();
        let at = as_f8.windows(3).position(|w| w == b"<f4").unwrap();
        as_f8[at + 2] = b'8';
        let error = read_f32_matrix(&as_f8).unwrap_err().to_string();
        assert!(error.contains("float32"), "{error}");
        assert!(read_f32_matrix(b"PK\x03\x04 not npy").is_err());
    }
}
