// One version of the LSH plan kernel for the planstage harness: the file
// named by PLAN_FILE (kernels/plan.cu or a variant of it) plus a kernel that
// reports its shared-memory formula, so the harness launches each version
// with its own size (as the engine does with the library's).
#include PLAN_FILE

extern "C" __global__ void plan_smem_bytes_p16(int block_rows, int d, int* out) {
    *out = da::plan_smem_bytes<da::PlanKey<16>>(16, block_rows, d);
}
