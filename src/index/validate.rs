//! Input checks every backend runs before it touches storage, so that bad input gets the same
//! typed error whichever backend is configured.

use super::{IndexError, IndexPoint};

/// Longest collection version name; it becomes a directory or a Qdrant collection name.
pub const MAX_VERSION_LEN: usize = 64;

/// Checks a batch for upsert: not empty, every vector `dim` long and finite.
pub fn check_points(points: &[IndexPoint], dim: usize) -> Result<(), IndexError> {
    if points.is_empty() {
        return Err(IndexError::EmptyBatch);
    }
    for p in points {
        if p.vector.len() != dim {
            return Err(IndexError::WrongDim {
                want: dim,
                got: p.vector.len(),
            });
        }
        if p.vector.iter().any(|x| !x.is_finite()) {
            return Err(IndexError::NonFinite {
                item: p.payload.item_id.to_string(),
            });
        }
    }
    Ok(())
}

/// Checks a query vector.
pub fn check_query(vector: &[f32], dim: usize) -> Result<(), IndexError> {
    if vector.len() != dim {
        return Err(IndexError::WrongDim {
            want: dim,
            got: vector.len(),
        });
    }
    if vector.iter().any(|x| !x.is_finite()) {
        return Err(IndexError::NonFinite {
            item: "<query>".into(),
        });
    }
    Ok(())
}

/// A version name becomes a directory name (edge) or a collection name (qdrant), so only a
/// safe alphabet is allowed and it may not start with a dot.
pub fn check_version_name(name: &str) -> Result<(), IndexError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_VERSION_LEN
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(IndexError::BadVersionName(name.to_string()))
    }
}

/// Checks a dimension for a new collection.
pub fn check_dim(dim: usize) -> Result<(), IndexError> {
    if dim == 0 || dim > 65_536 {
        return Err(IndexError::WrongDim { want: 1, got: dim });
    }
    Ok(())
}

/// The unit vector along `v`; cosine similarity is then a dot product. A zero vector stays
/// zero (it scores 0 against everything) rather than becoming NaN.
pub fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter().map(|x| x / norm).collect()
    } else {
        v.to_vec()
    }
}

/// [`normalized`], sharing `v` itself when it is unit length already (to half precision),
/// as the item tower's vectors are: the RAM copies then hold one allocation per item.
pub fn unit(v: &super::Vector) -> super::Vector {
    let norm2: f32 = v.iter().map(|x| x * x).sum();
    if (norm2 - 1.0).abs() <= UNIT_NORM2_SLACK || norm2 == 0.0 {
        v.clone()
    } else {
        normalized(&v.to_vec()).into()
    }
}

/// How far from 1 the squared norm of a unit vector can be once rounded to half precision
/// (at most about 1e-3: twice the rounding's relative error of 2^-11), with room to spare.
/// Normalising such a vector again would only round it again, to another allocation.
const UNIT_NORM2_SLACK: f32 = 2e-3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names() {
        assert!(check_version_name("v1.2_a-b").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(
                matches!(check_version_name(bad), Err(IndexError::BadVersionName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn normalization() {
        let n = normalized(&[3.0, 4.0]);
        assert!((n[0] - 0.6).abs() < 1e-6 && (n[1] - 0.8).abs() < 1e-6);
        assert_eq!(normalized(&[0.0, 0.0]), vec![0.0, 0.0]);
    }
}
