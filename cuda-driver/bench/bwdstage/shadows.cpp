// Host shadows of the kernels' `extern "C" __device__ int ..._smem` variables
// (the CUDA runtime registers them by a host symbol that whole-program
// compilation leaves undefined when the definition carries `extern`).
extern "C" {
int da_hbwd_bf16_d128_g1_smem, da_hbwd_bf16_d128_g2_smem;
int da_bwd_bf16_d128_g1_smem, da_bwd_bf16_d128_g2_smem, da_bwd_bf16_d128_g4_smem, da_bwd_bf16_d128_g8_smem;
}
