# qsnap "pattern" guest: a boot sector that makes every page of RAM above 1 MiB hot.
#
# It reads the RAM size from CMOS (registers 0x34/0x35: RAM above 16 MiB in 64 KiB units,
# as QEMU's pc machines set them), enters 32-bit protected mode with flat segments, sets
# the first byte of every 4 KiB page in [1 MiB, top of RAM) to 0, then forever increments
# those bytes in ascending page order and writes MARKER to COM1 after each full sweep.
# So at any frozen instant the bytes, read upwards, are all equal except for one place
# where they step down by one (mod 256): the sweep boundary the host-side check expects.
# Only RAM below 4 GiB exists for it (guests up to 3.5 GiB).
#
# This file is part of qsnap. SPDX-License-Identifier: GPL-2.0-or-later

        .set SWEEP_START, 0x100000
        .set PAGE_SIZE, 0x1000
        .set COM1, 0x3f8
        .set MARKER, 'P'
        .set CODE_SEL, 0x08
        .set DATA_SEL, 0x10

        .code16
        .text
        .globl _start
_start:
        cli
        cld
        xor %ax, %ax
        mov %ax, %ds
        mov %ax, %ss
        mov $0x7c00, %sp

        mov $0x35, %al          # CMOS: RAM above 16 MiB, high byte
        out %al, $0x70
        in $0x71, %al
        mov %al, %ah
        mov $0x34, %al          # low byte
        out %al, $0x70
        in $0x71, %al
        movzwl %ax, %ebx
        shl $16, %ebx
        add $0x1000000, %ebx    # ebx = end of the swept range

        in $0x92, %al           # fast A20 gate on, no reset
        or $0x02, %al
        and $0xfe, %al
        out %al, $0x92

        lgdtl gdt_desc
        mov %cr0, %eax
        or $1, %eax
        mov %eax, %cr0
        ljmpl $CODE_SEL, $protected

        .code32
protected:
        mov $DATA_SEL, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss

        mov $SWEEP_START, %ecx
clear:
        movb $0, (%ecx)
        add $PAGE_SIZE, %ecx
        cmp %ebx, %ecx
        jb clear

        mov $COM1, %dx
        mov $MARKER, %al
sweep:
        mov $SWEEP_START, %ecx
next_page:
        incb (%ecx)
        add $PAGE_SIZE, %ecx
        cmp %ebx, %ecx
        jb next_page
        out %al, %dx
        jmp sweep

        .p2align 3
gdt:
        .quad 0                         # null
        .quad 0x00cf9a000000ffff        # CODE_SEL: base 0, 4 GiB, 32-bit, execute/read
        .quad 0x00cf92000000ffff        # DATA_SEL: base 0, 4 GiB, read/write
gdt_desc:
        .word gdt_desc - gdt - 1
        .long gdt

        .org 510
        .byte 0x55, 0xaa
