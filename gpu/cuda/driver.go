package cuda

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"unsafe"

	"github.com/ebitengine/purego"

	"github.com/hcache/hcache/gpu"
)

// ErrNoDevice wraps every reason the CUDA backend cannot run here: no
// driver library, no device, no cuBLAS. Callers fall back to the CPU
// backend. It is gpu.ErrNoDevice, which gpu.Select tests for.
var ErrNoDevice = gpu.ErrNoDevice

// EnvCublas names an explicit libcublas path; it is tried before the search
// list.
const EnvCublas = "HCACHE_CUBLAS"

// cublasNames are the sonames tried, newest first.
var cublasNames = []string{"libcublas.so.13", "libcublas.so.12"}

// CublasSearchDirs lists where libcublas is looked for after the explicit
// path and the loader's own search (LD_LIBRARY_PATH, ld.so.cache): the CUDA
// toolkit's directories, then the NVIDIA wheels PyTorch installs into
// Python's site-packages (nvidia/cublas/lib, nvidia/cu13/lib).
func CublasSearchDirs() []string {
	var dirs []string
	add := func(glob string) {
		m, _ := filepath.Glob(glob)
		sort.Sort(sort.Reverse(sort.StringSlice(m)))
		dirs = append(dirs, m...)
	}
	add("/usr/local/cuda/lib64")
	add("/usr/local/cuda-*/lib64")
	add("/usr/local/cuda*/targets/x86_64-linux/lib")
	add("/usr/lib/x86_64-linux-gnu")
	for _, site := range []string{"/usr/local/lib/python3*/dist-packages", "/usr/local/lib/python3*/site-packages",
		"/usr/lib/python3*/dist-packages", "/opt/conda/lib/python3*/site-packages", "/root/.local/lib/python3*/site-packages",
		"/usr/local/lib64/python3*/site-packages",
		"/opt/*/.venv/lib/python3*/site-packages", "/opt/*/lib/python3*/site-packages", "/opt/venv/lib/python3*/site-packages"} {
		add(site + "/nvidia/cublas/lib")
		add(site + "/nvidia/cu13/lib")
		add(site + "/nvidia/cu12/lib")
	}
	return dirs
}

// driver holds the dlopened entry points.
type driver struct {
	cuda, cublas  uintptr
	cublasPath    string
	fn            map[string]uintptr
	cublasVersion int
}

var (
	drvMu sync.Mutex
	drv   *driver
)

// driverSymbols are the CUDA driver API entry points used (the _v2 ABI
// where one exists).
var driverSymbols = []string{
	"cuInit", "cuDriverGetVersion", "cuDeviceGetCount", "cuDeviceGet", "cuDeviceGetName", "cuDeviceTotalMem_v2",
	"cuDeviceGetAttribute",
	"cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRelease_v2", "cuCtxSetCurrent", "cuCtxSynchronize",
	"cuModuleLoadData", "cuModuleUnload", "cuModuleGetFunction", "cuLaunchKernel",
	"cuMemAlloc_v2", "cuMemFree_v2", "cuMemsetD8_v2", "cuMemsetD8Async",
	"cuMemcpyHtoD_v2", "cuMemcpyDtoH_v2", "cuMemcpyHtoDAsync_v2", "cuMemcpyDtoHAsync_v2",
	"cuMemHostRegister_v2", "cuMemHostUnregister", "cuMemGetAddressRange_v2",
	"cuStreamCreate", "cuStreamDestroy_v2", "cuStreamSynchronize", "cuStreamWaitEvent",
	"cuEventCreate", "cuEventDestroy_v2", "cuEventRecord", "cuEventSynchronize", "cuEventElapsedTime",
	"cuEventQuery", "cuMemAllocHost_v2", "cuMemFreeHost", "cuMemcpyDtoDAsync_v2", // the save path (save.go, savecheck.go)
	"cuGetErrorName", "cuGetErrorString",
}

// optionalSymbols are loaded when present (CUDA IPC); a driver without them
// still runs everything else, and OpenIPCCache/ExportIPC say what is missing.
var optionalSymbols = []string{"cuIpcGetMemHandle", "cuIpcOpenMemHandle_v2", "cuIpcCloseMemHandle"}

var cublasSymbols = []string{
	"cublasCreate_v2", "cublasDestroy_v2", "cublasSetStream_v2", "cublasGemmEx", "cublasGetVersion_v2", "cublasSetMathMode",
}

// Probe loads the driver and cuBLAS (as Open would) and reports the device
// count and the cuBLAS path, or an error wrapping ErrNoDevice that says why
// not. It is cheap: callers probe before building a model's weights.
func Probe(cublasPath string) (devices int, cublas string, err error) {
	d, err := loadDriver(cublasPath)
	if err != nil {
		return 0, "", err
	}
	var n int32
	d.call("cuDeviceGetCount", ptr(&n))
	return int(n), d.cublasPath, nil
}

// loadDriver dlopens libcuda.so.1 and libcublas; nothing here runs at init,
// only the first Open or Probe. A success is kept for the process (one
// cuBLAS per process: asking for another path afterwards is an error); a
// failure is not, so a later call with another cuBLAS path tries again.
func loadDriver(cublasPath string) (*driver, error) {
	drvMu.Lock()
	defer drvMu.Unlock()
	if drv != nil {
		if cublasPath != "" && cublasPath != drv.cublasPath {
			return nil, fmt.Errorf("cuda: cuBLAS is already loaded from %s in this process; cannot switch to %s", drv.cublasPath, cublasPath)
		}
		return drv, nil
	}
	d, err := openLibraries(cublasPath)
	if err != nil {
		return nil, err
	}
	drv = d
	return d, nil
}

func openLibraries(explicit string) (*driver, error) {
	d := &driver{fn: map[string]uintptr{}}
	h, err := purego.Dlopen("libcuda.so.1", purego.RTLD_NOW|purego.RTLD_GLOBAL)
	if err != nil {
		return nil, fmt.Errorf("%w: cannot load the driver library libcuda.so.1 (%v)", ErrNoDevice, err)
	}
	d.cuda = h
	for _, name := range driverSymbols {
		p, err := purego.Dlsym(h, name)
		if err != nil {
			return nil, fmt.Errorf("%w: libcuda.so.1 lacks %s (driver too old?): %v", ErrNoDevice, name, err)
		}
		d.fn[name] = p
	}
	for _, name := range optionalSymbols {
		if p, err := purego.Dlsym(h, name); err == nil {
			d.fn[name] = p
		}
	}
	if r := d.call("cuInit", 0); r != 0 {
		return nil, fmt.Errorf("%w: cuInit: %s", ErrNoDevice, d.errString(r))
	}
	var n int32
	if r := d.call("cuDeviceGetCount", ptr(&n)); r != 0 || n == 0 {
		return nil, fmt.Errorf("%w: the driver sees no device (%s)", ErrNoDevice, d.errString(r))
	}
	if err := d.openCublas(explicit); err != nil {
		return nil, err
	}
	return d, nil
}

// openCublas tries, in order: the explicit path (argument, then
// $HCACHE_CUBLAS), the loader's search by soname, then CublasSearchDirs.
func (d *driver) openCublas(explicit string) error {
	var tried []string
	try := func(path string) bool {
		h, err := purego.Dlopen(path, purego.RTLD_NOW|purego.RTLD_GLOBAL)
		if err != nil {
			tried = append(tried, fmt.Sprintf("%s (%v)", path, firstLine(err.Error())))
			return false
		}
		d.cublas, d.cublasPath = h, path
		return true
	}
	var candidates []string
	if explicit == "" {
		explicit = os.Getenv(EnvCublas)
	}
	if explicit != "" {
		candidates = append(candidates, explicit)
	}
	candidates = append(candidates, cublasNames...)
	for _, dir := range CublasSearchDirs() {
		for _, n := range cublasNames {
			if _, err := os.Stat(filepath.Join(dir, n)); err == nil {
				candidates = append(candidates, filepath.Join(dir, n))
			}
		}
	}
	ok := false
	for i, c := range candidates {
		if try(c) {
			ok = true
			break
		}
		if i == 0 && explicit != "" {
			return fmt.Errorf("%w: the cuBLAS library given (%s) cannot be loaded: %s", ErrNoDevice, explicit, strings.Join(tried, "; "))
		}
	}
	if !ok {
		return fmt.Errorf("%w: no libcublas.so.13 or .so.12 found (set %s or --cublas; tried %s)", ErrNoDevice, EnvCublas, strings.Join(tried, "; "))
	}
	for _, name := range cublasSymbols {
		p, err := purego.Dlsym(d.cublas, name)
		if err != nil {
			return fmt.Errorf("%w: %s lacks %s: %v", ErrNoDevice, d.cublasPath, name, err)
		}
		d.fn[name] = p
	}
	return nil
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// has reports whether an optional entry point was found.
func (d *driver) has(name string) bool { return d.fn[name] != 0 }

// call invokes a driver or cuBLAS function; both return a status code
// (0 = success).
func (d *driver) call(name string, args ...uintptr) int {
	p := d.fn[name]
	if p == 0 {
		panic("cuda: symbol not loaded: " + name)
	}
	r, _, _ := purego.SyscallN(p, args...)
	return int(int32(r))
}

// errString names a driver status code.
func (d *driver) errString(code int) string {
	if code == 0 {
		return "CUDA_SUCCESS"
	}
	var name, desc uintptr
	d.call("cuGetErrorName", uintptr(code), ptr(&name))
	d.call("cuGetErrorString", uintptr(code), ptr(&desc))
	return fmt.Sprintf("%s (%d): %s", cString(name), code, cString(desc))
}

// check turns a driver status into an error naming the call.
func (d *driver) check(what string, code int) error {
	if code == 0 {
		return nil
	}
	return fmt.Errorf("cuda: %s: %s", what, d.errString(code))
}

// checkBlas turns a cuBLAS status into an error.
func checkBlas(what string, code int) error {
	if code == 0 {
		return nil
	}
	names := map[int]string{1: "NOT_INITIALIZED", 3: "ALLOC_FAILED", 7: "INVALID_VALUE", 8: "ARCH_MISMATCH",
		11: "MAPPING_ERROR", 13: "EXECUTION_FAILED", 14: "INTERNAL_ERROR", 15: "NOT_SUPPORTED", 16: "LICENSE_ERROR"}
	return fmt.Errorf("cuda: %s: CUBLAS_STATUS_%s (%d)", what, names[code], code)
}

func cString(p uintptr) string {
	if p == 0 {
		return "?"
	}
	var b []byte
	for i := uintptr(0); i < 512; i++ {
		c := *(*byte)(cptr(p + i))
		if c == 0 {
			break
		}
		b = append(b, c)
	}
	return string(b)
}

// ptr passes the address of a Go value to C. A goroutine's stack can move
// (when it grows) between taking an address and the call, and C would then
// write to the old stack; so everything passed goes through escape, which
// makes the compiler put it on the heap, where nothing moves.
func ptr[T any](p *T) uintptr {
	escape(p)
	return uintptr(unsafe.Pointer(p))
}

var (
	escapeSink any
	neverTrue  bool
)

// escape makes x escape to the heap (escape analysis does not know that
// neverTrue is never set).
func escape(x any) {
	if neverTrue {
		escapeSink = x
	}
}

// cptr turns an address C returned into a pointer (memory Go does not own).
func cptr(p uintptr) unsafe.Pointer { return *(*unsafe.Pointer)(unsafe.Pointer(&p)) }

func bptr(b []byte) uintptr {
	if len(b) == 0 {
		return 0
	}
	escape(b)
	return uintptr(unsafe.Pointer(&b[0]))
}

// lockThread pins the goroutine to its OS thread and makes ctx current
// there: the driver keeps the current context per thread.
func (d *driver) lockThread(ctx uintptr) error {
	runtime.LockOSThread()
	if r := d.call("cuCtxSetCurrent", ctx); r != 0 {
		runtime.UnlockOSThread()
		return d.check("cuCtxSetCurrent", r)
	}
	return nil
}
