# Sourced by the GPU scripts: unpack $BIN from $BIN.xz if needed (a copy to a GPU host can be the
# xz copy), and point LD_LIBRARY_PATH at the CUDA 13 libraries of the machine's Python packages
# (PyTorch brings them) and at the driver's libcuda.
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then
    xz -dc "$BIN.xz" > "$BIN" 2>/dev/null \
        || python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$BIN.xz" "$BIN"
    chmod +x "$BIN"
fi
BIN=$(realpath "$BIN")

# CUDA 13 runtime libraries from the machine's Python packages (PyTorch brings them), and the
# driver's libcuda wherever the image keeps it.
libdirs=$(python3 - <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
want = ("libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libcudart.so.13", "libnccl.so.2")
dirs = []
for r in roots:
    for w in want:
        for p in glob.glob(os.path.join(r, "**", w), recursive=True):
            d = os.path.dirname(p)
            if d not in dirs:
                dirs.append(d)
print(":".join(dirs))
PY
)
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
    [ -e "$d/libcuda.so.1" ] && libdirs="$libdirs:$d"
done
export LD_LIBRARY_PATH="$libdirs:${LD_LIBRARY_PATH:-}"
