/*
 * The first instructions of the keel image: the arm64 Image header, then
 * the EL2 entry of the boot CPU (x0 = physical address of the DTB).
 *
 * Before any Rust runs: check we are at EL2, turn the MMU and data cache
 * off (a loader may have left them on), apply our own R_AARCH64_RELATIVE
 * relocations for the load address, clear BSS, take the boot CPU's stack
 * (the first per-CPU slot after the image: 4 KiB guard, 16 KiB stack,
 * 4 KiB emergency stack), point TPIDR_EL2 at its CpuLocal and VBAR_EL2 at
 * the vectors, so that even the earliest fault is reported.
 */
    .section .text.head, "ax"
    .global _start
_start:
    b       primary_entry           /* code0 */
    .word   0                       /* code1 */
    .quad   0                       /* text_offset: any 2 MiB boundary */
    .quad   __image_size            /* image_size, bss included */
    .quad   0xa                     /* flags: LE, 4K pages, anywhere in RAM */
    .quad   0, 0, 0                 /* res2..res4 */
    .ascii  "ARM\x64"               /* magic */
    .word   0                       /* res5 */

primary_entry:
    mov     x19, x0
    mrs     x1, CurrentEL
    lsr     x1, x1, #2
    cmp     x1, #2
    b.ne    early_fail

    mrs     x1, sctlr_el2
    bic     x1, x1, #1              /* M */
    bic     x1, x1, #(1 << 2)       /* C */
    msr     sctlr_el2, x1
    isb

    adr     x20, _start             /* load address (linked at 0) */
    adrp    x2, __rela_start
    add     x2, x2, :lo12:__rela_start
    adrp    x3, __rela_end
    add     x3, x3, :lo12:__rela_end
1:  cmp     x2, x3
    b.hs    2f
    ldp     x4, x5, [x2], #16       /* r_offset, r_info */
    ldr     x6, [x2], #8            /* r_addend */
    cmp     x5, #0x403              /* R_AARCH64_RELATIVE */
    b.ne    early_fail
    add     x6, x6, x20
    str     x6, [x4, x20]
    b       1b
2:
    adrp    x2, __bss_start
    add     x2, x2, :lo12:__bss_start
    adrp    x3, __bss_end
    add     x3, x3, :lo12:__bss_end
3:  cmp     x2, x3
    b.hs    4f
    stp     xzr, xzr, [x2], #16
    b       3b
4:
    adrp    x2, __image_end
    add     x2, x2, :lo12:__image_end
    add     x3, x2, #(4096 + 16384)
    mov     sp, x3
    add     x4, x3, #4096
    adrp    x5, KEEL_CPU_LOCAL
    add     x5, x5, :lo12:KEEL_CPU_LOCAL
    str     x4, [x5]
    msr     tpidr_el2, x5
    adrp    x6, keel_vectors
    add     x6, x6, :lo12:keel_vectors
    msr     vbar_el2, x6
    isb

    mov     x0, x19
    mov     x1, x20
    bl      keel_main
    b       early_fail

    /*
     * A secondary CPU (or one resuming from a powerdown suspend), started
     * by firmware at EL2 with the MMU off because keel relayed the host's
     * PSCI call with this address; x0 = the CPU's index. Its CpuLocal
     * already holds its stacks and the host's entry point.
     */
    .global keel_secondary_entry
keel_secondary_entry:
    cmp     x0, #8                  /* MAX_CPUS */
    b.hs    early_fail
    mrs     x1, sctlr_el2
    bic     x1, x1, #1
    bic     x1, x1, #(1 << 2)
    msr     sctlr_el2, x1
    isb
    adrp    x2, KEEL_CPU_LOCAL
    add     x2, x2, :lo12:KEEL_CPU_LOCAL
    mov     x3, #64                 /* size of CpuLocal */
    madd    x2, x0, x3, x2
    msr     tpidr_el2, x2
    ldr     x4, [x2, #40]           /* stack_top */
    cbz     x4, early_fail
    mov     sp, x4
    adrp    x6, keel_vectors
    add     x6, x6, :lo12:keel_vectors
    msr     vbar_el2, x6
    isb
    bl      keel_secondary_main
    b       early_fail

    /* Nothing to print with yet: end the run with semihosting exit code 3
     * (needs -semihosting; otherwise park). */
early_fail:
    mov     x0, #0x18
    adr     x1, early_exit_block
    hlt     #0xf000
5:  wfe
    b       5b

    .balign 8
early_exit_block:
    .quad   0x20026                 /* ADP_Stopped_ApplicationExit */
    .quad   3
