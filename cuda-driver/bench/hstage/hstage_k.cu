// One kernel version of the hstage harness (see hstage.cu): the file named by
// HFWD_FILE, its namespace renamed on the command line (-Dda=...) so that
// several versions link into one binary; entry points in namespace HS_NS.
#include <cstdio>
#include <cstdlib>

#include HFWD_FILE
#include "harness.cuh"

namespace HS_NS {
using T = __nv_bfloat16;
constexpr int D = DA_HEAD_DIM;

template <int G, int X>
__global__ void __launch_bounds__(da::kHThreads, 1)
    hkern(const __grid_constant__ FwdParams p, const __grid_constant__ HTmaMaps maps) {
#if DA_HOPPER
#if HS_TMA
    da::hfwd_body<T, D, G, X>(p, maps);
#else
    (void)maps;
    da::hfwd_body<T, D, G, X>(p);
#endif
#endif
}


template <int G, int X>
static void launch_t(const FwdParams& p, const HTmaMaps& m, dim3 grid, cudaStream_t st) {
    constexpr int smem = da::HTraits<D, G>::kSmem;
    static bool once = false;
    if (!once) {
        CK(cudaFuncSetAttribute(hkern<G, X>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        once = true;
    }
    hkern<G, X><<<grid, da::kHThreads, smem, st>>>(p, m);
    CK(cudaGetLastError());
}

template <int G>
static bool launch_g(int x, const FwdParams& p, const HTmaMaps& m, dim3 grid, cudaStream_t st) {
    switch (x) {
        case 0: launch_t<G, 0>(p, m, grid, st); return true;
        case 1: launch_t<G, 1>(p, m, grid, st); return true;
        case 3: launch_t<G, 3>(p, m, grid, st); return true;
        case 4: launch_t<G, 4>(p, m, grid, st); return true;
        case 7: launch_t<G, 7>(p, m, grid, st); return true;
        case 16: launch_t<G, 16>(p, m, grid, st); return true;
        case 20: launch_t<G, 20>(p, m, grid, st); return true;
#if HS_PROF
        case 32: launch_t<G, 32>(p, m, grid, st); return true;
#endif
        default: return false;
    }
}

// Launches hfwd_body<bf16, D, g, x>; false for an (g, x) not built.
bool launch(int g, int x, const FwdParams& p, const HTmaMaps& m, dim3 grid, cudaStream_t st) {
    switch (g) {
        case 1: return launch_g<1>(x, p, m, grid, st);
        case 2: return launch_g<2>(x, p, m, grid, st);
        case 4: return launch_g<4>(x, p, m, grid, st);
        case 8: return launch_g<8>(x, p, m, grid, st);
        default: return false;
    }
}
// The cycle counters of kAblate bit 4 (versions with hprof only).
bool prof(unsigned long long* out, bool reset) {
#if HS_PROF
    if (reset) {
        unsigned long long z[8] = {};
        CK(cudaMemcpyToSymbol(da::hprof, z, sizeof(z)));
    } else {
        CK(cudaMemcpyFromSymbol(out, da::hprof, 8 * sizeof(unsigned long long)));
    }
    return true;
#else
    (void)out, (void)reset;
    return false;
#endif
}
// Points kAblate bit 5's timeline at `words` (8 per CTA; versions with htl only).
bool timeline(unsigned long long* words) {
#if HS_PROF
    CK(cudaMemcpyToSymbol(da::htl, &words, sizeof(words)));
    return true;
#else
    (void)words;
    return false;
#endif
}
}  // namespace HS_NS
