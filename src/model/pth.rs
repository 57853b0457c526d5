//! Upstream's PyTorch checkpoints (`*.pth`: a zip holding a pickle and the tensors' bytes), read
//! without trusting them. A pickle can name any Python global — `os.system` as easily as a tensor
//! constructor; nothing here ever runs one, but a file that names anything beyond what a plain
//! state dict needs is refused, with the global named, as PyTorch's `weights_only` loader refuses
//! it. Each tensor's declared size is checked against a bound before its bytes are read, so a
//! header claiming `[2^30, 2^30]` costs nothing.

use std::io::Read;
use std::path::Path;

use candle_core::Tensor;

use crate::error::{bad_file, Result};

/// The globals a state dict of tensors needs: what PyTorch's `weights_only` unpickler allows for
/// tensors, parameters and ordered dicts.
const ALLOWED_GLOBALS: [&str; 22] = [
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
    "torch.nn.parameter.Parameter",
    "torch.Size",
    "torch.Tensor",
    "torch.device",
    "torch.FloatStorage",
    "torch.DoubleStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ShortStorage",
    "torch.CharStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
    "torch.storage.UntypedStorage",
    "torch.storage.TypedStorage",
];

/// Every global (`module.name`) the pickle stream `data` names, walking its opcodes (the subset
/// candle's reader understands; anything else is refused, as candle would refuse it).
pub fn pickle_globals(data: &[u8]) -> std::result::Result<Vec<String>, String> {
    let mut r = data;
    let mut globals = Vec::new();
    let skip = |r: &mut &[u8], n: usize| -> std::result::Result<(), String> {
        if r.len() < n {
            return Err("the pickle ends inside an opcode".into());
        }
        *r = &r[n..];
        Ok(())
    };
    let line = |r: &mut &[u8]| -> std::result::Result<String, String> {
        let end = r
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("a GLOBAL without its newline")?;
        let s = String::from_utf8_lossy(&r[..end])
            .trim_end_matches('\r')
            .to_string();
        *r = &r[end + 1..];
        Ok(s)
    };
    let u32_len = |r: &[u8]| -> std::result::Result<usize, String> {
        let b: [u8; 4] = r
            .get(..4)
            .ok_or("a length cut short")?
            .try_into()
            .expect("4 bytes");
        Ok(u32::from_le_bytes(b) as usize)
    };
    while let Some((&op, rest)) = r.split_first() {
        r = rest;
        match op {
            b'.' => return Ok(globals),
            b'c' => {
                let module = line(&mut r)?;
                let name = line(&mut r)?;
                globals.push(format!("{module}.{name}"));
            }
            0x80 | b'q' | b'K' | b'h' => skip(&mut r, 1)?,
            b'M' => skip(&mut r, 2)?,
            b'r' | b'J' | b'j' => skip(&mut r, 4)?,
            b'G' => skip(&mut r, 8)?,
            b'X' => {
                let n = u32_len(r)?;
                skip(&mut r, 4 + n)?;
            }
            0x8a => {
                let n = *r.first().ok_or("a LONG1 cut short")? as usize;
                skip(&mut r, 1 + n)?;
            }
            b')' | b'R' | b'(' | b't' | b'Q' | 0x85 | 0x86 | 0x87 | 0x88 | 0x89 | b'N' | b's'
            | b'u' | b'}' | b'd' | b'b' | 0x81 | b']' | b'a' | b'e' => {}
            other => {
                return Err(format!(
                    "pickle opcode 0x{other:02x} is not one a state dict uses"
                ))
            }
        }
    }
    Err("the pickle has no STOP".into())
}

/// Refuse `path` unless every pickle in it names only allowed globals.
fn check_globals(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| bad_file(path, e.to_string()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| bad_file(path, format!("not a PyTorch zip checkpoint: {e}")))?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| n.ends_with("data.pkl"))
        .map(|n| n.to_string())
        .collect();
    for name in names {
        let mut entry = zip
            .by_name(&name)
            .map_err(|e| bad_file(path, e.to_string()))?;
        // A state dict's pickle is small; a larger one is not a state dict.
        let mut data = Vec::new();
        (&mut entry)
            .take(64 << 20)
            .read_to_end(&mut data)
            .map_err(|e| bad_file(path, e.to_string()))?;
        let globals = pickle_globals(&data).map_err(|e| bad_file(path, format!("{name}: {e}")))?;
        if let Some(g) = globals
            .iter()
            .find(|g| !ALLOWED_GLOBALS.contains(&g.as_str()))
        {
            return Err(bad_file(
                path,
                format!("{name} refers to the Python global {g}, which a checkpoint of tensors does not need; refusing it (as PyTorch's weights_only loader does)\nHINT: save a plain state dict: torch.save(model.state_dict(), path)"),
            ));
        }
    }
    Ok(())
}

/// Every tensor of the checkpoint at `path`, after checking its globals and that no tensor
/// declares more than `max_elems` elements.
pub fn read(path: &Path, max_elems: usize) -> Result<Vec<(String, Tensor)>> {
    check_globals(path)?;
    let infos = candle_core::pickle::read_pth_tensor_info(path, false, None)
        .map_err(|e| bad_file(path, e.to_string()))?;
    if let Some(t) = infos
        .iter()
        .find(|t| t.layout.shape().elem_count() > max_elems)
    {
        return Err(bad_file(
            path,
            format!(
                "tensor {} declares shape {:?}, more than the {max_elems} elements any tensor of this model has",
                t.name,
                t.layout.dims()
            ),
        ));
    }
    candle_core::pickle::read_all(path).map_err(|e| bad_file(path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_global_is_found_and_unknown_opcodes_are_refused() {
        // PROTO 2, GLOBAL collections OrderedDict, EMPTY_TUPLE, REDUCE, GLOBAL os system, STOP.
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\n)R");
        p.extend(b"cos\nsystem\n.");
        assert_eq!(
            pickle_globals(&p).unwrap(),
            ["collections.OrderedDict", "os.system"]
        );
        // STACK_GLOBAL (0x93), which candle's reader does not take either.
        assert!(pickle_globals(&[0x80, 2, 0x93, b'.']).is_err());
        assert!(
            pickle_globals(b"X\xff\xff\xff\x7f").is_err(),
            "a length past the end"
        );
        assert!(pickle_globals(b"cos\n").is_err());
    }
}
