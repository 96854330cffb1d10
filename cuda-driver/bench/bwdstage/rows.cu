// bwd.cu's kernels (the row passes da_bwd_prep, da_bwd_dq) for the bwdstage
// harness: the file named by BWD_FILE (a version's bwd.cu).
#include BWD_FILE
