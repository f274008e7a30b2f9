//! Reading the `.npy` reference arrays that `deploy/models/make_tiny_gemma4.py` saves: version 1
//! or 2 headers, little-endian, C order. Small enough not to need a crate.
#![allow(dead_code)] // each test file reads the dtypes it needs

use std::path::Path;

/// An array's shape and its values widened to f64 (bool as 0/1).
pub struct Npy {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl Npy {
    pub fn f32(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }

    pub fn i64(&self) -> Vec<i64> {
        self.values.iter().map(|&v| v as i64).collect()
    }

    pub fn bools(&self) -> Vec<bool> {
        self.values.iter().map(|&v| v != 0.0).collect()
    }
}

pub fn read(path: &Path) -> Npy {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{} is not .npy", path.display());
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[header_start..header_start + header_len]).unwrap();
    let field = |name: &str| {
        let start =
            header.find(&format!("'{name}':")).unwrap_or_else(|| panic!("no {name} in {header}")) + name.len() + 3;
        header[start..].trim_start().to_owned()
    };
    let descr = field("descr");
    let descr = descr.trim_start_matches('\'').split('\'').next().unwrap().to_owned();
    assert!(field("fortran_order").starts_with("False"), "{}: Fortran order", path.display());
    let shape_text = field("shape");
    let shape: Vec<usize> = shape_text[1..shape_text.find(')').unwrap()]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let data = &bytes[header_start + header_len..];
    let values: Vec<f64> = match descr.as_str() {
        "<f4" => data.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect(),
        "<f8" => data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        "<i8" => data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        "<i4" => data.chunks_exact(4).map(|c| f64::from(i32::from_le_bytes(c.try_into().unwrap()))).collect(),
        "<i2" => data.chunks_exact(2).map(|c| f64::from(i16::from_le_bytes(c.try_into().unwrap()))).collect(),
        "|u1" => data.iter().map(|&b| f64::from(b)).collect(),
        "|b1" => data.iter().map(|&b| f64::from(b)).collect(),
        other => panic!("{}: dtype {other} not handled", path.display()),
    };
    assert_eq!(values.len(), shape.iter().product::<usize>(), "{}", path.display());
    Npy { shape, values }
}
